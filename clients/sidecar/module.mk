# gorgon-sidecar: the OpenAI-compatible HTTP server (libmicrohttpd, jansson)
# over libgorgon. Its template, UTF-8 and metrics code is also a small
# library, so that tests/sidecar/test_chat.c can check the renderers
# directly (tests/module.mk links each sidecar test with libgorgon only:
# the extra library is added here, for that test).
sidecar_LIB_SRCS := clients/sidecar/sc_chat.c clients/sidecar/sc_util.c
$(eval $(call add_lib,sidecar,$(sidecar_LIB_SRCS)))
$(eval $(call add_prog,gorgon-sidecar,$(filter-out $(sidecar_LIB_SRCS),$(wildcard clients/sidecar/*.c)),sidecar gorgon ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS) -lmicrohttpd -ljansson))
$(B)/tests/test-sidecar-chat: $(B)/lib/libsidecar.a
$(B)/tests/test-sidecar-chat: LDLIBS += $(B)/lib/libsidecar.a
# The suites that read JSON (the openai client's output, response bodies).
$(B)/tests/test-sidecar-openai $(B)/tests/test-sidecar-http: LDLIBS += -ljansson
