common_SRCS := $(wildcard common/*.c)
$(eval $(call add_lib,common,$(common_SRCS)))
COMMON_LDLIBS := $(shell pkg-config --libs inih 2>/dev/null || echo -linih) -lm
