/* INI configuration (parsed by libinih), kept as "section.key" = value pairs.
 *
 *   cm_config *cfg;
 *   int rc = cm_config_load(&cfg, "/etc/gorgon/gorgond.ini");
 *   if (rc < 0) ...            // message already in cm_config_error()
 *   int64_t poll_us = 50;
 *   rc = cm_config_get_i64(cfg, "gorgond.poll_us", 0, 10000000, &poll_us);
 *   cm_config_destroy(cfg);
 *
 * Getters leave *out untouched when the key is absent and return 0 (absent)
 * or 1 (found); a value that does not parse or is out of range returns
 * -EINVAL with a message naming the key. Keys outside any section are
 * stored as ".key" -> addressed as "key". Later duplicates win. */
#ifndef GORGON_CM_CONFIG_H
#define GORGON_CM_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cm_config cm_config;

/* Returns 0, -ENOENT (no file), -EINVAL (syntax; cm_config_error says the line). */
int cm_config_load(cm_config **out, const char *path);
/* Parse from a string (tests, embedded defaults). */
int cm_config_parse(cm_config **out, const char *text);
/* An empty config (every getter answers "absent"). */
int cm_config_create(cm_config **out);
void cm_config_destroy(cm_config *cfg);
/* Set or replace a value (command-line overrides). */
int cm_config_set(cm_config *cfg, const char *key, const char *value);

/* Thread-local text of the last load/parse/get error. */
const char *cm_config_error(void);

const char *cm_config_get_str(const cm_config *cfg, const char *key);
int cm_config_get_i64(const cm_config *cfg, const char *key, int64_t min, int64_t max,
                      int64_t *out);
int cm_config_get_f64(const cm_config *cfg, const char *key, double min, double max,
                      double *out);
int cm_config_get_bool(const cm_config *cfg, const char *key, bool *out);
/* Iterate: returns the number of entries; key/value of entry i. */
size_t cm_config_count(const cm_config *cfg);
int cm_config_entry(const cm_config *cfg, size_t i, const char **key, const char **value);

#endif
