# taskguard — make targets. `make test` is the test command (CI runs it).
SHELL := /bin/bash
GOBIN := $(shell go env GOPATH)/bin
export PATH := $(GOBIN):$(PATH)
# Packages and their tests start the real servers they need (Datastore
# emulators, memcached, redis-server) on free loopback ports.
GOTEST_FLAGS ?= -race -count=1 -timeout=20m

.PHONY: run demo test deps lint vet bench torture fuzz-short clean

run: ## serve every function locally on embedded defaults
	go run ./cmd/taskguard-local

demo: ## enqueue a burst of tasks and print the timeline
	go run ./cmd/taskguard-local -demo

deps: ## install/check what the tests need
	@bash scripts/deps.sh

lint: deps ## gofmt, go vet, staticcheck
	@out="$$(gofmt -l .)"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	staticcheck ./...

test: lint fuzz-short ## the full suite, race detector on
	go test $(GOTEST_FLAGS) ./...

# Fuzz targets: the seed corpora (testdata/fuzz) run with every go test;
# this fuzzes each target for FUZZTIME more.
FUZZTIME ?= 5s
FUZZ_TARGETS := FuzzLockKeys:./internal/badinput FuzzWith:./internal/badinput \
	FuzzDecodeEnvelope:./tasks FuzzWorker:./tasks

fuzz-short: ## fuzz every target for FUZZTIME (5s) each
	@set -e; for t in $(FUZZ_TARGETS); do \
		go test -run='^$$' -fuzz="^$${t%%:*}$$" -fuzztime=$(FUZZTIME) "$${t#*:}"; \
	done

bench: deps ## benchmarks against the real servers
	go test -run='^$$' -bench=. -benchmem ./...

torture: deps ## the long reliability run (minutes)
	TASKGUARD_TORTURE=long go test -race -count=1 -timeout=30m -run=Torture -v ./internal/torture/
