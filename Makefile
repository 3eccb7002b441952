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

# Modules of their own under examples/, built against this checkout.
EXAMPLES := examples/shop

lint: deps ## gofmt, go vet, staticcheck
	@out="$$(gofmt -l .)"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	staticcheck ./...
	@set -e; for m in $(EXAMPLES); do (cd $$m && go vet ./... && staticcheck ./...); done

test: lint fuzz-short ## the full suite, race detector on
	go test $(GOTEST_FLAGS) ./...
	@set -e; for m in $(EXAMPLES); do echo "cd $$m && go test ./..."; (cd $$m && go test $(GOTEST_FLAGS) ./...); done

# Fuzz targets: the seed corpora (testdata/fuzz) run with every go test;
# this fuzzes each target for FUZZTIME more: a count of executions (about
# 3 to 5 seconds each here), not a duration, because Go 1.26's fuzz
# coordinator can fail a target with a bare "context deadline exceeded"
# when a duration runs out while a worker is mid-execution (golang/go#75804,
# fixed in Go 1.27); a count has no deadline to race.
FUZZTIME ?= 15000x
FUZZ_TARGETS := FuzzLockKeys:./internal/badinput FuzzWith:./internal/badinput \
	FuzzDecodeEnvelope:./tasks FuzzWorker:./tasks FuzzIdentityRoundTrip:./tasks \
	FuzzString:./internal/ident

fuzz-short: ## fuzz every target for FUZZTIME (15000 executions) each
	@set -e; for t in $(FUZZ_TARGETS); do \
		go test -run='^$$' -fuzz="^$${t%%:*}$$" -fuzztime=$(FUZZTIME) "$${t#*:}"; \
	done

# The benchmarks (internal/bench, and tasks.BenchmarkBurst) run once each (-benchtime=1x: every one
# takes its own fixed number of samples) against the real servers, and
# internal/benchplot turns their output into the tables of BENCHMARKS.md and
# the hand-off plot. BenchmarkDistance runs Datastore through internal/netdelay
# (loopback and +15 ms each way, side by side). The raw output, with the
# machine it ran on, is kept in $(BENCH_OUT).
BENCH_OUT ?= docs/bench/bench.txt
BENCH_FLAGS ?= -run='^$$' -bench=. -benchtime=1x -benchmem -timeout=45m
# The burst on one lock id, park mode vs 429 mode with deploy's queue (the
# 429 mode waits for the queue's retry ladder: minutes); benchplot writes its
# table into BENCHMARKS.md's burst section.
BURST_FLAGS ?= -run='^$$' -bench='^BenchmarkBurst$$' -benchtime=1x -timeout=20m
# Park mode at N = 10, 50, 200 and 1,000 tasks on one lock id, on the
# in-memory and the Datastore wait lists (about 8 minutes), and the burst of
# 20 on Datastore, loopback and production-like (BenchmarkParkDistance,
# about a minute).
PARK_BURST_FLAGS ?= -run='^$$' -bench='^BenchmarkPark(Burst|Distance)$$' -benchtime=1x -timeout=30m

bench: deps ## benchmarks against the real servers; rewrites BENCHMARKS.md and docs/bench/handoff.svg
	@mkdir -p $(dir $(BENCH_OUT))
	@{ echo "# command: make bench (go test $(BENCH_FLAGS) ./internal/bench)"; \
	  echo "# date: $$(date -u +%FT%TZ)"; \
	  echo "# nproc: $$(nproc)"; \
	  echo "# cpu model: $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"; \
	  echo "# $$(go version)"; \
	  echo "# load average (1, 5, 15 min) before: $$(cut -d' ' -f1-3 /proc/loadavg)"; } > $(BENCH_OUT)
	set -o pipefail; go test $(BENCH_FLAGS) ./internal/bench | tee -a $(BENCH_OUT)
	@echo "# park burst command: go test $(PARK_BURST_FLAGS) ./tasks" >> $(BENCH_OUT)
	set -o pipefail; go test $(PARK_BURST_FLAGS) ./tasks | tee -a $(BENCH_OUT)
	@echo "# burst command: go test $(BURST_FLAGS) ./tasks" >> $(BENCH_OUT)
	set -o pipefail; go test $(BURST_FLAGS) ./tasks | tee -a $(BENCH_OUT)
	@echo "# load average (1, 5, 15 min) after: $$(cut -d' ' -f1-3 /proc/loadavg)" >> $(BENCH_OUT)
	go run ./internal/benchplot -in $(BENCH_OUT) -md BENCHMARKS.md -svg docs/bench/handoff.svg

torture: deps ## the long reliability run (minutes)
	TASKGUARD_TORTURE=long go test -race -count=1 -timeout=30m -run=Torture -v ./internal/torture/
