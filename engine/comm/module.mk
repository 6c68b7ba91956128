# engine/comm: collectives between the ranks of a tensor-parallel group
# (shared-memory backend; NCCL with NCCL=1, loaded at run time). Needs only
# common (and libdl for NCCL, part of glibc).
comm_SRCS := $(filter-out engine/comm/comm_bench.c,$(wildcard engine/comm/*.c))
$(eval $(call add_lib,comm,$(comm_SRCS)))
COMM_LDLIBS := $(COMMON_LDLIBS)
$(eval $(call add_prog,gorgon-comm-bench,engine/comm/comm_bench.c,comm common,$(COMM_LDLIBS)))
ifeq ($(NCCL),1)
$(B)/engine/comm/comm_nccl.o: CPPFLAGS += -DGORGON_NCCL -isystem $(NCCL_PREFIX)/include \
	-DGORGON_CUDA_LIBDIR='"$(NCCL_PREFIX)/lib64"'
endif
