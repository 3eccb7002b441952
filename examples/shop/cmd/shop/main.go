// Command shop runs the shop's functions locally with the Functions
// Framework, as Google's documentation runs a Go function: every function
// at /<Name> (or only FUNCTION_TARGET at /), on PORT (8080 by default).
//
//	go run ./cmd/shop
package main

import (
	"log"
	"os"

	"github.com/GoogleCloudPlatform/functions-framework-go/funcframework"

	_ "example.com/shop"
)

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	if err := funcframework.StartHostPort(os.Getenv("HOST"), port); err != nil {
		log.Fatalf("funcframework.StartHostPort: %v", err)
	}
}
