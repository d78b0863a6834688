# meshca. `make run` starts a CA on an embedded default; `make test` runs
# every test. Tools are pinned and installed by scripts/tools.sh.

TOOLS ?= $(HOME)/.cache/meshca/bin
export PATH := $(TOOLS):$(PATH)
# kube-apiserver and etcd for the integration tests (scripts/kube.sh).
MESHCA_KUBE_ASSETS ?= $(HOME)/.cache/meshca/kube
export MESHCA_KUBE_ASSETS
# vault for the integration tests (scripts/vault.sh).
MESHCA_VAULT_ASSETS ?= $(HOME)/.cache/meshca/vault
export MESHCA_VAULT_ASSETS

GO       ?= go
PROTOS   := $(shell find proto -name '*.proto')
DATA_DIR ?= .meshca

.PHONY: all
all: lint test

.PHONY: tools
tools:
	@MESHCA_TOOLS=$(TOOLS) bash scripts/tools.sh
	@bash scripts/kube.sh

## run: start meshca-server on the embedded default (data in ./$(DATA_DIR)).
.PHONY: run
run:
	$(GO) run ./cmd/meshca-server --data-dir $(DATA_DIR) --demo

.PHONY: build
build:
	$(GO) build -o bin/ ./cmd/...

## test: generated code and manifests are fresh, vet is clean, every test
## passes with -race (against a real kube-apiserver and etcd, and a real
## Vault dev server).
.PHONY: test
test: tools vault generate-check manifests-check vet test-istio
	$(GO) test -race -count=1 ./...

## test-istio: Istio's own CA client against meshca-server (tests/istio, a
## module of its own, so that the main module never depends on istio.io/istio).
.PHONY: test-istio
test-istio:
	bash scripts/test-istio.sh

.PHONY: vet
vet:
	$(GO) vet ./...

## lint: gofmt, go vet, staticcheck and govulncheck. scripts/vulndb.sh
## finds the vulnerability database (https://vuln.go.dev, or an offline copy
## imported with MESHCA_VULNDB_SOURCE). Without one, VULNCHECK=auto (the
## default) says so and goes on, VULNCHECK=required fails, VULNCHECK=off
## skips the check.
VULNCHECK ?= auto
.PHONY: lint vulncheck
lint: tools vet vulncheck
	@fmt=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$fmt" ]; then echo "gofmt needed:"; echo "$$fmt"; exit 1; fi
	staticcheck ./...

vulncheck:
	@case "$(VULNCHECK)" in auto|required) ;; off) echo "govulncheck: skipped (VULNCHECK=off)"; exit 0;; \
	  *) echo "VULNCHECK=$(VULNCHECK): want auto, required or off"; exit 1;; esac; \
	db=$$(MESHCA_TOOLS=$(TOOLS) bash scripts/vulndb.sh); rc=$$?; \
	if [ $$rc -eq 3 ]; then \
	  echo "govulncheck: NOT RUN: no vulnerability database is reachable; dependencies were NOT checked for known vulnerabilities."; \
	  if [ "$(VULNCHECK)" = required ]; then exit 1; fi; exit 0; \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	echo "govulncheck -db $$db ./..."; govulncheck -db "$$db" ./...

## proto: regenerate the Go code from proto/ with the pinned tools.
.PHONY: proto
proto: tools
	protoc -I proto \
	  --go_out=proto --go_opt=paths=source_relative \
	  --go-grpc_out=proto --go-grpc_opt=paths=source_relative \
	  $(PROTOS)

## generate-check: fail when the committed generated code is stale.
.PHONY: generate-check
generate-check: tools
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	protoc -I proto \
	  --go_out=$$tmp --go_opt=paths=source_relative \
	  --go-grpc_out=$$tmp --go-grpc_opt=paths=source_relative \
	  $(PROTOS); \
	for f in $$(cd $$tmp && find . -name '*.go'); do \
	  if ! cmp -s $$tmp/$$f proto/$$f; then \
	    echo "generated code is stale: proto/$$f (run make proto)"; exit 1; fi; \
	done; \
	stale=$$(cd proto && find . -name '*.pb.go' | while read f; do [ -f $$tmp/$$f ] || echo $$f; done); \
	if [ -n "$$stale" ]; then echo "generated files without a .proto: $$stale"; exit 1; fi; \
	echo "generated code is fresh"

## manifests: render deploy/kubernetes from the Helm chart (installs helm if needed).
.PHONY: manifests manifests-check image
manifests:
	bash scripts/render-manifests.sh
manifests-check:
	@bash scripts/render-manifests.sh --check

IMAGE ?= meshca/meshca-server:dev
image:
	docker build -f deploy/Dockerfile -t $(IMAGE) .

## fuzz: run every native fuzz test (go test -fuzz), each for FUZZTIME
## (default 1m; docs/fuzzing.md records runs of `make fuzz FUZZTIME=10m`).
## Targets are found by name: every `func FuzzXxx` of a _test.go file of
## this module. A crash stops the run; its input is kept in the package's
## testdata/fuzz/FuzzXxx/, a regression test from then on. FUZZFLAGS adds
## flags (the runs recorded used -parallel 1).
FUZZTIME  ?= 1m
FUZZFLAGS ?=
FUZZ_TARGETS = $(shell grep -rEo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]+' . \
	| grep -v '^./tests/' | sed -E 's|^(.*)/[^/]*_test.go:func (Fuzz.*)|\1:\2|' | sort -u)
.PHONY: fuzz fuzz-short
fuzz:
	@for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; name=$${t##*:}; \
	  echo "== $$pkg $$name ($(FUZZTIME))"; \
	  $(GO) test $$pkg -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZTIME) $(FUZZFLAGS) || exit 1; \
	done

## fuzz-short: the CI pass (make test runs it): every fuzz target for
## FUZZSHORT executions. A count, not a duration: with a duration, Go
## 1.26's fuzz coordinator can fail a target with a bare "context deadline
## exceeded" when the time runs out mid-execution on a loaded machine
## (golang/go#75804, fixed in Go 1.27). 500 executions take a few seconds
## even for the slowest target, the config loaders.
FUZZSHORT ?= 500x
fuzz-short:
	@$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZSHORT)

# A short fuzzing pass is part of the tests.
test: fuzz-short

## vault: build the Vault server that internal/vaulttest starts on loopback
## (scripts/vault.sh: cached in $(MESHCA_VAULT_ASSETS); 10 to 25 minutes cold).
.PHONY: vault
vault:
	@bash scripts/vault.sh >/dev/null

## bench: the standard set of meshctl bench runs (steady; storm of 1,000
## and 10,000 new workloads; mixed) against a fresh bin/meshca-server
## --demo --profiling on free ports (scripts/bench.sh). Not part of test.
.PHONY: bench
bench: build
	bash scripts/bench.sh

.PHONY: clean
clean:
	rm -rf bin
