common_SRCS := $(wildcard common/*.c)
$(eval $(call add_lib,common,$(common_SRCS)))
COMMON_LDLIBS := $(shell pkg-config --libs inih 2>/dev/null || echo -linih) -lm

# The version programs report (cm_version): the tree's git description,
# rewritten only when it changes so that nothing relinks for nothing.
GORGON_VERSION := $(shell git describe --always --dirty --tags 2>/dev/null || echo unknown)
$(B)/gen/cm_version_gen.h: FORCE
	@mkdir -p $(@D)
	$(Q)v='#define CM_VERSION_STRING "$(GORGON_VERSION)"'; \
		[ "$$(cat $@ 2>/dev/null)" = "$$v" ] || echo "$$v" > $@
$(B)/common/cm_version.o: $(B)/gen/cm_version_gen.h
CFLAGS_common_cm_version := -I$(B)/gen
