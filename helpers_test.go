package taskguard

import (
	"net/http/httptest"
	"testing"

	"github.com/taskguard/taskguard/internal/oauthdemo"
)

type tokenEndpoint struct {
	*oauthdemo.Endpoint
	url string
}

func newTokenEndpoint(t *testing.T) tokenEndpoint {
	ep := oauthdemo.NewEndpoint()
	srv := httptest.NewServer(ep)
	t.Cleanup(srv.Close)
	return tokenEndpoint{ep, srv.URL}
}
