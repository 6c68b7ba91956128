# Every tests/DIR/test_NAME.c becomes the Criterion binary test-DIR-NAME,
# linked with DIR's libraries, tests/DIR/util/*.c (helpers of DIR) and
# tests/util/*.c (helpers of every suite).
define test_dir
$(foreach f,$(wildcard tests/$(1)/test_*.c),$(eval $(call add_test,test-$(1)-$(patsubst test_%.c,%,$(notdir $(f))),$(f) $(wildcard tests/$(1)/util/*.c) $(wildcard tests/util/*.c),$(2),$(3))))
endef
$(eval $(call test_dir,common,common,$(COMMON_LDLIBS)))
$(eval $(call test_dir,kernels,kernels common,$(KERNELS_LDLIBS) $(COMMON_LDLIBS)))
$(eval $(call test_dir,engine,$(ENGINE_LIBS),$(ENGINE_LDLIBS)))
$(eval $(call test_dir,ipc,ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS)))
$(eval $(call test_dir,comm,comm ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS)))
$(eval $(call test_dir,clients,gorgon ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS)))
# (appliance tests also write model-side files such as Medusa heads: engine)
$(eval $(call test_dir,appliance,gorgon $(ENGINE_LIBS) ipc common,$(IPC_LDLIBS) $(ENGINE_LDLIBS)))
# Suites that drive our programs from outside (the HTTP sidecar with curl and
# the openai npm client, the Python package, the deploy files): they link
# only the client library and the shared test helpers.
$(eval $(call test_dir,sidecar,gorgon ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS)))
$(eval $(call test_dir,python,gorgon ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS)))
$(eval $(call test_dir,deploy,gorgon ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS)))

# `make soak` (tests/soak/module.mk): not part of `all` or `test`.
include tests/soak/module.mk
