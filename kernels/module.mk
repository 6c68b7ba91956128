# kernels/cpu: scalar reference + AVX2 + AVX-512 variants, compiled with
# per-file ISA flags and chosen at run time (the binary runs on any x86-64).
kernels_SRCS := $(wildcard kernels/cpu/*.c)
$(eval $(call add_lib,kernels,$(kernels_SRCS)))
KN_AVX2_FLAGS   := -mavx2 -mfma -mf16c
KN_AVX512_FLAGS := -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16 -mfma -mf16c -mavx2
$(B)/kernels/cpu/%_avx2.o: CFLAGS += $(KN_AVX2_FLAGS)
$(B)/kernels/cpu/%_avx512.o: CFLAGS += $(KN_AVX512_FLAGS)
KERNELS_LDLIBS := -lm
