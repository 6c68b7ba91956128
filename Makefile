# gorgon — one non-recursive Makefile; each folder adds itself through module.mk.
#
#   make                 build everything (release mode, build/release/)
#   make test            build and run every Criterion suite
#   make run             build, start gorgond, talk to it, stop it
#   make bench           run gorgon-bench suites
#   make deps            install missing Debian packages (deploy/install-deps.sh)
#   make install         PREFIX=/usr/local DESTDIR= (deploy/install.sh); make uninstall
#
# Knobs: MODE=release|debug  SAN=address,undefined|thread  V=1  WERROR=1
#        CUDA=auto|0|1 (auto: on when nvcc is found and kernels/cuda/ exists)
#        NCCL=auto|0|1 (auto: on when nccl.h is found beside nvcc)

MODE   ?= release
SAN    ?=
V      ?= 0
WERROR ?= 0
CUDA   ?= auto

# Each (mode, sanitizer) pair gets its own object tree so that switching knobs
# never mixes instrumented and plain objects.
comma := ,
ifeq ($(SAN),)
B := build/$(MODE)
else
B := build/$(MODE)-$(subst $(comma),_,$(SAN))
endif
BIN := build/bin

ifeq ($(V),1)
Q :=
else
Q := @
endif

CC      ?= cc
ifeq ($(origin CC),default)
CC := gcc
endif
# CUDA: the backend in kernels/cuda/ (its module.mk adds its objects to
# libkernels and its libraries to KERNELS_LDLIBS) is built when CUDA=1, or
# with CUDA=auto (the default) when nvcc is found, the toolkit beside it has
# the static CUDA runtime, and the tree has the backend. CUDA=1 without them
# is an error.
#
# CUDA_HOME (the toolkit's root) is where nvcc itself lives, which it reports
# as _HERE_ under -dryrun: the nvcc on PATH may be a wrapper script elsewhere
# (/usr/local/bin/nvcc on these machines execs /usr/local/cuda-13.0/bin/nvcc),
# so the root cannot be read off its path. Set CUDA_HOME to override.
NVCC_PATH := $(shell command -v nvcc 2>/dev/null || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })
ifeq ($(origin CUDA_HOME),undefined)
CUDA_HOME := $(if $(NVCC_PATH),$(patsubst %/bin,%,$(shell $(NVCC_PATH) -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*_HERE_=//p' | head -n 1)))
endif
CUDA_LIBDIR := $(patsubst %/libcudart_static.a,%,$(firstword $(wildcard \
	$(CUDA_HOME)/lib64/libcudart_static.a $(CUDA_HOME)/targets/x86_64-linux/lib/libcudart_static.a)))
CUDA_MODULE := $(wildcard kernels/cuda/module.mk)
ifeq ($(CUDA),auto)
CUDA := $(if $(and $(NVCC_PATH),$(CUDA_LIBDIR),$(CUDA_MODULE)),1,0)
endif
ifeq ($(CUDA),1)
ifeq ($(CUDA_MODULE),)
$(error CUDA=1: this tree has no CUDA backend yet (kernels/cuda/module.mk))
endif
ifeq ($(NVCC_PATH),)
$(error CUDA=1: nvcc not found (PATH or /usr/local/cuda/bin))
endif
ifeq ($(CUDA_LIBDIR),)
$(error CUDA=1: no libcudart_static.a in $(or $(CUDA_HOME),<nvcc reported no root>)/lib64 or targets/x86_64-linux/lib (set CUDA_HOME to the toolkit's root))
endif
NVCC      := $(NVCC_PATH)
else ifneq ($(CUDA),0)
$(error CUDA=$(CUDA): expected auto, 0 or 1)
endif
# NCCL: comm's NCCL backend (engine/comm/comm_nccl.c) compiles against the
# nccl.h in the toolkit (CUDA_HOME) and loads libnccl/libcudart at run time
# (dlopen), so it needs no GPU and no CUDA library to build or to start.
# NCCL=auto (default): when that nccl.h exists; NCCL=1 insists; NCCL=0 never.
NCCL ?= auto
NCCL_PREFIX := $(CUDA_HOME)
ifeq ($(NCCL),auto)
NCCL := $(if $(and $(NCCL_PREFIX),$(wildcard $(NCCL_PREFIX)/include/nccl.h)),1,0)
endif
ifeq ($(NCCL),1)
ifeq ($(wildcard $(NCCL_PREFIX)/include/nccl.h),)
$(error NCCL=1: no nccl.h in the CUDA toolkit ($(or $(NCCL_PREFIX),nvcc not found)/include))
endif
else ifneq ($(NCCL),0)
$(error NCCL=$(NCCL): expected auto, 0 or 1)
endif

WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wvla
ifeq ($(WERROR),1)
WARN += -Werror
endif

ifeq ($(MODE),debug)
OPT := -O0 -g3
else
OPT := -O2 -g
endif

CPPFLAGS += -D_GNU_SOURCE -I. -MMD -MP
CFLAGS   += -std=c17 $(OPT) $(WARN) -fno-strict-aliasing -pthread -fPIC
LDFLAGS  += -pthread
LDLIBS   +=

ifneq ($(SAN),)
CFLAGS  += -fsanitize=$(SAN) -fno-omit-frame-pointer
LDFLAGS += -fsanitize=$(SAN)
# Tests that link programs of their own against this build's libgorgon.a
# need the same runtime (tests/clients/test_install.c).
CPPFLAGS += -DGORGON_SAN_LDFLAGS='"-fsanitize=$(SAN)"'
ifneq ($(findstring undefined,$(SAN)),)
CFLAGS  += -fno-sanitize-recover=undefined
endif
endif

PKG_CFLAGS := $(shell pkg-config --cflags liburing inih 2>/dev/null)
CPPFLAGS   += $(PKG_CFLAGS)

# ---------------------------------------------------------------------------
# Helpers used by module.mk files.
#
#   $(call add_lib,NAME,SOURCES)           -> $(B)/lib/libNAME.a
#   $(call add_prog,NAME,SOURCES,LIBS,LDLIBS) -> $(B)/bin/NAME, linked to build/bin/NAME
#   $(call add_test,NAME,SOURCES,LIBS,LDLIBS) -> $(B)/tests/NAME (Criterion)
#
# LIBS are module library names, most dependent first (e.g. "appliance ipc common").
# ---------------------------------------------------------------------------
ALL_PROGS :=
ALL_TESTS :=
ALL_LIBS  :=

objs = $(patsubst %.c,$(B)/%.o,$(filter %.c,$(1))) $(patsubst %.cu,$(B)/%.cu.o,$(filter %.cu,$(1)))
libpaths = $(foreach l,$(1),$(B)/lib/lib$(l).a)

define add_lib
ALL_LIBS += $(B)/lib/lib$(1).a
$(B)/lib/lib$(1).a: $(call objs,$(2))
	@mkdir -p $$(@D)
	@$(if $(filter 1,$(V)),,echo "  AR      $$@")
	$(Q)rm -f $$@ && ar rcs $$@ $$^
endef

define add_prog
ALL_PROGS += $(BIN)/$(1)
$(B)/bin/$(1): $(call objs,$(2)) $(call libpaths,$(3))
	@mkdir -p $$(@D)
	@$(if $(filter 1,$(V)),,echo "  LD      $$@")
	$(Q)$$(CC) $$(LDFLAGS) -o $$@ $(call objs,$(2)) $(call libpaths,$(3)) $(4) $$(LDLIBS)
# (checked every run: make judges a link by its target's age, so a link to
# another flavour's newer binary, e.g. after SAN=thread, looked up to date)
$(BIN)/$(1): $(B)/bin/$(1) FORCE
	@mkdir -p $$(@D)
	$(Q)[ "$$$$(readlink $$@)" = ../$(patsubst build/%,%,$(B))/bin/$(1) ] || \
		ln -sfn ../$(patsubst build/%,%,$(B))/bin/$(1) $$@
endef

# Sanitizer builds link a shim that works around Criterion under ASan/TSan (see the file).
TEST_SHIM := $(if $(SAN),$(B)/tests/sanitizer_shim.o)

define add_test
ALL_TESTS += $(B)/tests/$(1)
$(B)/tests/$(1): $(call objs,$(2)) $(call libpaths,$(3)) $(TEST_SHIM)
	@mkdir -p $$(@D)
	@$(if $(filter 1,$(V)),,echo "  LD      $$@")
	$(Q)$$(CC) $$(LDFLAGS) -o $$@ $(call objs,$(2)) $(TEST_SHIM) $(call libpaths,$(3)) $(4) -lcriterion -ldl $$(LDLIBS)
endef

.PHONY: all test run bench deps clean fuzz install uninstall FORCE
all:

# Dependency step: a cheap dpkg check at parse time, the installer only when
# something is missing, so that `make run` / `make test` work on a fresh machine.
ifeq ($(filter deps clean,$(MAKECMDGOALS)),)
ifneq ($(shell deploy/install-deps.sh --check >/dev/null 2>&1 && echo ok),ok)
$(info gorgon: some Debian packages are missing; running deploy/install-deps.sh)
DEPS_LOG := $(shell deploy/install-deps.sh >&2; echo $$?)
ifneq ($(DEPS_LOG),0)
$(error deploy/install-deps.sh failed; run it by hand to see why)
endif
endif
endif

# Module files, in dependency order (later ones use earlier ones' variables).
MODULES := common ipc $(if $(filter 1,$(CUDA)),kernels/cuda) kernels engine/model engine/comm engine engine/worker appliance clients clients/bench clients/sidecar tests tests/fuzz
include $(wildcard $(addsuffix /module.mk,$(MODULES)))

all: $(ALL_PROGS) $(ALL_LIBS)
FORCE:

$(B)/%.o: %.c
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  CC      $<")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(CFLAGS_$(subst /,_,$*)) -c -o $@ $<

# (NVCCFLAGS come from kernels/cuda/module.mk)
$(B)/%.cu.o: %.cu
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  NVCC    $<")
	$(Q)$(NVCC) $(NVCCFLAGS) -I. -c -o $@ $<

deps:
	$(Q)deploy/install-deps.sh

test: all $(ALL_TESTS)
	$(Q)tests/run-tests.sh $(ALL_TESTS)

clean:
	rm -rf build

-include $(shell find $(B) -name '*.d' 2>/dev/null)

run: all
	$(Q)deploy/run-demo.sh

PREFIX  ?= /usr/local
DESTDIR ?=
install: all
	$(Q)PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" deploy/install.sh $(B)
uninstall:
	$(Q)PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" deploy/install.sh --uninstall $(B)

# Benchmarks: the IPC suite and, when a model is given (MODEL=FILE), the engine suite.
bench: all
	$(Q)$(BIN)/gorgon-bench ipc
	$(Q)if [ -n "$(MODEL)" ]; then $(BIN)/gorgon-bench engine --model "$(MODEL)"; fi
