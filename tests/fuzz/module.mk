# tests/fuzz: libFuzzer targets. Built only by `make fuzz` (never by `all`),
# with clang and the fuzzer + ASan + UBSan runtimes; the sources each target
# covers are compiled here directly rather than reusing the gcc objects.
# Run: tests/fuzz/run-fuzz.sh [SECONDS]   (GGUF reader + tokenizer, safetensors +
# Medusa trees, handshake + region + descriptor validation)
FUZZ_CC    ?= clang
FUZZ_FLAGS := -std=c17 -D_GNU_SOURCE -I. -g -O1 -fno-omit-frame-pointer \
              -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined

# $(call fuzz_target,NAME,SOURCES,HEADERS,LDLIBS) -> $(B)/fuzz/NAME, part of `make fuzz`
define fuzz_target
$(B)/fuzz/$(1): $(2) $(3)
	@mkdir -p $$(@D)
	@$$(if $$(filter 1,$$(V)),,echo "  FUZZ    $$@")
	$$(Q)$$(FUZZ_CC) $$(FUZZ_FLAGS) -o $$@ $(2) $(4)
fuzz: $(B)/fuzz/$(1)
endef

$(eval $(call fuzz_target,fuzz_gguf,\
	tests/fuzz/fuzz_gguf.c engine/model/gguf.c engine/model/tokenizer.c engine/model/eng_err.c,\
	engine/model/gguf.h engine/model/tokenizer.h engine/model/eng_err.h kernels/kn.h,-lm))

$(eval $(call fuzz_target,fuzz_safetensors,\
	tests/fuzz/fuzz_safetensors.c engine/model/safetensors.c engine/medusa/medusa_tree.c engine/model/eng_err.c,\
	engine/model/safetensors.h engine/medusa/medusa_tree.h engine/model/eng_err.h,-ljansson -lm))

$(eval $(call fuzz_target,fuzz_handshake,\
	tests/fuzz/fuzz_handshake.c ipc/ctl.c ipc/region.c ipc/ring.c ipc/validate.c common/cm_log.c,\
	ipc/ipc.h ipc/ipc_abi.h ipc/ipc_int.h common/common.h common/cm_log.h,-lnuma))
