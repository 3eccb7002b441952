package taskstest

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// fakeSignature ends every token the emulator makes. It is not a signature:
// no verifier of Google-signed tokens accepts these tokens.
const fakeSignature = "taskstest-unsigned"

// TokenClaims are the claims of the fake OIDC token the emulator sends for a
// task with an OidcToken, shaped like the claims of a Google-signed ID token.
type TokenClaims struct {
	Issuer        string `json:"iss"`
	Audience      string `json:"aud"`
	AuthorizedBy  string `json:"azp"`
	Subject       string `json:"sub"`
	Email         string `json:"email"`
	EmailVerified bool   `json:"email_verified"`
	IssuedAt      int64  `json:"iat"`
	Expires       int64  `json:"exp"`
}

func fakeToken(email, audience string, now time.Time) string {
	enc := base64.RawURLEncoding
	header, _ := json.Marshal(map[string]string{"alg": "RS256", "typ": "JWT", "kid": "taskstest"})
	claims, _ := json.Marshal(TokenClaims{
		Issuer:        "https://accounts.google.com",
		Audience:      audience,
		AuthorizedBy:  email,
		Subject:       email,
		Email:         email,
		EmailVerified: true,
		IssuedAt:      now.Unix(),
		Expires:       now.Add(time.Hour).Unix(),
	})
	return enc.EncodeToString(header) + "." + enc.EncodeToString(claims) + "." + enc.EncodeToString([]byte(fakeSignature))
}

// DecodeToken returns the claims of a token the emulator made, given either
// the bare token or the whole "Bearer ..." Authorization value. It fails for
// any other token; it verifies nothing else.
func DecodeToken(token string) (TokenClaims, error) {
	token = strings.TrimPrefix(token, "Bearer ")
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return TokenClaims{}, errors.New("taskstest: token is not a JWT")
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || string(sig) != fakeSignature {
		return TokenClaims{}, errors.New("taskstest: token was not made by the emulator")
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return TokenClaims{}, fmt.Errorf("taskstest: token claims: %w", err)
	}
	var c TokenClaims
	if err := json.Unmarshal(raw, &c); err != nil {
		return TokenClaims{}, fmt.Errorf("taskstest: token claims: %w", err)
	}
	return c, nil
}

// DefaultOAuthScope is the scope of the access token sent for a task whose
// oauth_token sets none.
const DefaultOAuthScope = "https://www.googleapis.com/auth/cloud-platform"

// accessTokenPrefix starts every fake access token. Real access tokens are
// opaque; the emulator's carry their claims so that tests can read them.
const accessTokenPrefix = "ya29.taskstest."

// AccessTokenClaims are what the fake OAuth access token the emulator sends
// for a task with an OAuthToken stands for.
type AccessTokenClaims struct {
	Email   string `json:"email"`
	Scope   string `json:"scope"`
	Expires int64  `json:"exp"`
}

func fakeAccessToken(email, scope string, now time.Time) string {
	claims, _ := json.Marshal(AccessTokenClaims{Email: email, Scope: scope, Expires: now.Add(time.Hour).Unix()})
	return accessTokenPrefix + base64.RawURLEncoding.EncodeToString(claims)
}

// DecodeAccessToken returns the claims of an access token the emulator
// made, given either the bare token or the whole "Bearer ..." Authorization
// value. It fails for any other token, OIDC tokens included; no Google API
// accepts these tokens.
func DecodeAccessToken(token string) (AccessTokenClaims, error) {
	token = strings.TrimPrefix(token, "Bearer ")
	raw, ok := strings.CutPrefix(token, accessTokenPrefix)
	if !ok {
		return AccessTokenClaims{}, errors.New("taskstest: not an access token made by the emulator")
	}
	b, err := base64.RawURLEncoding.DecodeString(raw)
	if err != nil {
		return AccessTokenClaims{}, fmt.Errorf("taskstest: access token: %w", err)
	}
	var c AccessTokenClaims
	if err := json.Unmarshal(b, &c); err != nil {
		return AccessTokenClaims{}, fmt.Errorf("taskstest: access token: %w", err)
	}
	return c, nil
}
