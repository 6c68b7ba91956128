# clients: libgorgon (static and shared) and the `gorgon` CLI.
# Both libraries carry the ipc and common objects the client needs, so that
# -lgorgon is the whole link line (plus liburing, libnuma and libm, which
# gorgon.pc lists): libgorgon.a alone resolves every gorgon_* call. The INI
# reader (common/cm_config.c, libinih) is left out: a client never reads our
# config files. The shared library exports only the gorgon_* API
# (clients/libgorgon.map).
gorgon_SRCS := $(wildcard clients/*.c) $(ipc_SRCS) $(filter-out common/cm_config.c,$(common_SRCS))
$(eval $(call add_lib,gorgon,$(gorgon_SRCS)))
GORGON_LDLIBS := $(IPC_LDLIBS) -lm

GORGON_SONAME := libgorgon.so.0
GORGON_SO_OBJS := $(call objs,$(gorgon_SRCS))
ALL_LIBS += $(B)/lib/libgorgon.so build/lib/libgorgon.so build/lib/$(GORGON_SONAME)
$(B)/lib/$(GORGON_SONAME): $(GORGON_SO_OBJS) clients/libgorgon.map
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -shared -Wl,-soname,$(GORGON_SONAME) -Wl,--version-script=clients/libgorgon.map -Wl,-z,defs -o $@ $(GORGON_SO_OBJS) $(GORGON_LDLIBS)
$(B)/lib/libgorgon.so: $(B)/lib/$(GORGON_SONAME)
	$(Q)ln -sfn $(GORGON_SONAME) $@
# build/lib/ holds the library of the last mode built (like build/bin/).
build/lib/libgorgon.so build/lib/$(GORGON_SONAME): $(B)/lib/libgorgon.so
	@mkdir -p $(@D)
	$(Q)ln -sfn ../$(patsubst build/%,%,$(B))/lib/$(GORGON_SONAME) $@

# `gorgon pull` downloads with libcurl and checks SHA-256 with OpenSSL's
# libcrypto (the TLS library libcurl already uses).
$(eval $(call add_prog,gorgon,clients/cli/gorgon_cli.c clients/cli/pull.c,gorgon ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS) -lcurl -lcrypto))
