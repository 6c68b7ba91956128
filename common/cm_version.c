#include "common/cm_version.h"

#include <stdio.h>
#include <string.h>

#include "cm_version_gen.h" /* CM_VERSION_STRING, written by common/module.mk */

const char *cm_version(void)
{
    return CM_VERSION_STRING;
}

int cm_version_requested(int argc, char **argv, const char *prog)
{
    if (argc < 2 || strcmp(argv[1], "--version") != 0)
        return 0;
    printf("%s (gorgon) %s\n", prog, cm_version());
    return 1;
}
