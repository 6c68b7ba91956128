# engine/comm: collectives between the ranks of a tensor-parallel group
# (shared-memory backend; NCCL later). Needs only common.
comm_SRCS := $(filter-out engine/comm/comm_bench.c,$(wildcard engine/comm/*.c))
$(eval $(call add_lib,comm,$(comm_SRCS)))
COMM_LDLIBS := $(COMMON_LDLIBS)
$(eval $(call add_prog,gorgon-comm-bench,engine/comm/comm_bench.c,comm common,$(COMM_LDLIBS)))
