# tests/soak: `make soak`, the long-running abuse test (not part of `all`,
# `test` or CI). gorgon-soak starts its own gorgond (this build's) with the
# stories260K model; see tests/soak/soak.c for what it does and checks.
#   make soak                 10 minutes
#   make soak SOAK_MINUTES=2  (SOAK_CLIENTS, SOAK_SEED likewise)
SOAK_MINUTES ?= 10
SOAK_CLIENTS ?= 4
SOAK_SEED    ?=
SOAK_BIN := $(B)/soak/gorgon-soak

$(SOAK_BIN): $(call objs,tests/soak/soak.c) $(call libpaths,gorgon ipc common)
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $(call objs,tests/soak/soak.c) $(call libpaths,gorgon ipc common) $(IPC_LDLIBS) $(COMMON_LDLIBS) $(LDLIBS)

.PHONY: soak
soak: all $(SOAK_BIN)
	$(Q)$(SOAK_BIN) --gorgond $(B)/bin/gorgond --minutes $(SOAK_MINUTES) --clients $(SOAK_CLIENTS) $(if $(SOAK_SEED),--seed $(SOAK_SEED))
