#include "common/cm_device.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int cm_device_parse(const char *s, int *cuda_index)
{
    if (!cuda_index)
        return -EINVAL;
    if (!s || !*s || strcmp(s, "cpu") == 0) {
        *cuda_index = -1;
        return 0;
    }
    if (strncmp(s, "cuda", 4) != 0)
        return -EINVAL;
    if (s[4] == '\0') {
        *cuda_index = 0;
        return 0;
    }
    if (s[4] != ':' || s[5] < '0' || s[5] > '9')
        return -EINVAL;
    char *end;
    errno = 0;
    long v = strtol(s + 5, &end, 10);
    if (errno || *end || v > 1023)
        return -EINVAL;
    *cuda_index = (int)v;
    return 0;
}
