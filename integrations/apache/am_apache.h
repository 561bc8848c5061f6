/* Declarations shared by the files of mod_appmanager, the Apache connector of appmanager.
 *
 * mod_appmanager.c   the module: configuration records, directive table, request hooks
 * am_settings.c      reading directives into configuration records, their checks, !~App
 * am_core.c          starting the core with Apache, keeping it across restarts
 *
 * The protocol is docs/protocol/connector.md in the appmanager repository.
 */

#ifndef AM_APACHE_H
#define AM_APACHE_H

#include "httpd.h"
#include "http_config.h"
#include "apr_tables.h"

/* The vocabulary of integrations/appmanager_directives.def. */
typedef enum { AM_STR, AM_PATH, AM_INT, AM_FLOAT, AM_BOOL, AM_ENV, AM_LIST } am_kind;
typedef enum { AM_ROLE_APP, AM_ROLE_CORE, AM_ROLE_MODULE } am_role;
typedef enum {
    AM_CHECK_NONE,
    AM_CHECK_MIN,
    AM_CHECK_NONEMPTY,
    AM_CHECK_URI_PATH,
    AM_CHECK_USER,
    AM_CHECK_GROUP,
    AM_CHECK_READABLE_FILE,
    AM_CHECK_HOST_PORT,
    AM_CHECK_URL,
    AM_CHECK_PORT
} am_check;

/* One id per setting that has a directive, in the order of the generated table. */
typedef enum {
#define AM_SETTING(id, name, kind, role, check, minimum, choices) id,
#include "appmanager_directives.def"
#undef AM_SETTING
    AM_NSETTINGS
} am_setting_id;

/* A row of the generated table. */
typedef struct {
    const char *name;    /* the key sent to the core, e.g. "min_instances" */
    am_kind kind;
    am_role role;
    am_check check;
    double minimum;      /* for AM_CHECK_MIN */
    const char *choices; /* '|'-separated, or NULL */
} am_setting;

extern const am_setting am_settings[AM_NSETTINGS];

/* The settings of one scope of the configuration (server, virtual host, <Directory>,
 * <Location>), and of the merge of nested scopes. Created and merged by Apache; never changed
 * once the configuration is read, so request threads share them freely. */
typedef struct {
    /* What the directives set here, NULL where they did not: the text of a scalar setting
     * ("on"/"off" for a boolean, an absolute path for app_root) ... */
    const char *value[AM_NSETTINGS];
    /* ... and for AM_ENV ("NAME=VALUE" strings) and AM_LIST settings, the values in order. */
    apr_array_header_t *values[AM_NSETTINGS];
    /* "&key=value..." for every app setting set here or above, app_root aside: the part of
     * !~App that does not depend on the request. Recomputed after each directive and merge. */
    const char *app_fields;
    /* "app_root=..." when app_root is set here or above, else NULL (the default comes from
     * the DocumentRoot at request time). */
    const char *app_root_field;
    /* Whether an app setting (app_root included) is set here or above. */
    int has_app_settings;
} am_dir_conf;

/* Per virtual host; only the main server's copy of the core-wide settings is used. */
typedef struct {
    am_dir_conf *settings;       /* core-role and module-role settings given at server level */
    /* Computed in post_config from the server's DocumentRoot: */
    const char *document_root;   /* the DocumentRoot these two were computed for */
    const char *default_root_field; /* "app_root=<parent of DocumentRoot>" */
    int app_detected;            /* an app's startup file is in that parent */
} am_server_conf;

/* am_settings.c */
void *am_create_dir_conf(apr_pool_t *p, char *dir);
void *am_merge_dir_conf(apr_pool_t *p, void *base, void *add);
void *am_create_server_conf(apr_pool_t *p, server_rec *s);
void *am_merge_server_conf(apr_pool_t *p, void *base, void *add);
const char *am_cmd_setting(cmd_parms *cmd, void *dir_conf, const char *args);
const char *am_cmd_ignored(cmd_parms *cmd, void *dir_conf, const char *args);
char *am_encode(apr_pool_t *p, const char *text);
char *am_app_root_field(apr_pool_t *p, const char *app_root);
int am_detect_app(apr_pool_t *p, const char *app_root, const am_dir_conf *conf);
char *am_parent_dir(apr_pool_t *p, const char *path);

/* am_core.c */
typedef struct {
    const char *socket; /* where the core listens (ours or AppManagerCoreSocket's) */
    const char *secret; /* what requests carry in !~Secret */
} am_core_info;
const char *am_core_ensure(apr_pool_t *pconf, apr_pool_t *ptemp, server_rec *s,
                           const am_dir_conf *settings, am_core_info *info);

extern module AP_MODULE_DECLARE_DATA appmanager_module;

#endif
