/* Reading the AppManager* and Passenger* directives into configuration records: the checks
 * that make a bad value fail `apache2 -t` with the directive's name and the reason, the merge of
 * nested scopes, and the request-independent part of the !~App field
 * (docs/protocol/connector.md). The directives and their checks come from the generated table
 * integrations/appmanager_directives.def, so they match appmanager/settings.py. */

#include "am_apache.h"

#include "http_log.h"
#include "apr_strings.h"
#include "apr_lib.h"

#include <errno.h>
#include <grp.h>
#include <math.h>
#include <pwd.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

const am_setting am_settings[AM_NSETTINGS] = {
#define AM_SETTING(id, name, kind, role, check, minimum, choices) \
    [id] = {name, kind, role, check, minimum, choices},
#include "appmanager_directives.def"
#undef AM_SETTING
};

/* The startup files the core detects an app by (CANDIDATES in appmanager/detect.py), for
 * Passenger's behaviour: a virtual host whose DocumentRoot's parent holds an app is served by
 * appmanager without AppManagerEnabled. A test compares this list with detect.py. */
static const char *const am_startup_files[] = {
    "passenger_wsgi.py", "config.ru", "wsgi.py", "asgi.py", "app.py", "main.py", "app.js",
    "server.js", NULL};

void *am_create_dir_conf(apr_pool_t *p, char *dir)
{
    am_dir_conf *conf = apr_pcalloc(p, sizeof(*conf));
    (void)dir;
    conf->app_fields = "";
    return conf;
}

/* Every byte outside A-Z a-z 0-9 - . _ ~ / as %XX (connector.md). */
char *am_encode(apr_pool_t *p, const char *text)
{
    static const char hex[] = "0123456789ABCDEF";
    apr_size_t n = 0;
    const unsigned char *s;
    char *out, *o;

    for (s = (const unsigned char *)text; *s; s++) {
        n += (apr_isalnum(*s) || *s == '-' || *s == '.' || *s == '_' || *s == '~' || *s == '/')
                 ? 1
                 : 3;
    }
    out = o = apr_palloc(p, n + 1);
    for (s = (const unsigned char *)text; *s; s++) {
        if (apr_isalnum(*s) || *s == '-' || *s == '.' || *s == '_' || *s == '~' || *s == '/') {
            *o++ = (char)*s;
        }
        else {
            *o++ = '%';
            *o++ = hex[*s >> 4];
            *o++ = hex[*s & 15];
        }
    }
    *o = '\0';
    return out;
}

char *am_app_root_field(apr_pool_t *p, const char *app_root)
{
    return apr_pstrcat(p, "app_root=", am_encode(p, app_root), NULL);
}

/* The directory that holds `path` ("/srv/app/public" -> "/srv/app"), for the default app root. */
char *am_parent_dir(apr_pool_t *p, const char *path)
{
    char *copy = apr_pstrdup(p, path);
    apr_size_t len = strlen(copy);
    char *slash;

    while (len > 1 && copy[len - 1] == '/') {
        copy[--len] = '\0';
    }
    slash = strrchr(copy, '/');
    if (slash == NULL) {
        return apr_pstrdup(p, ".");
    }
    if (slash == copy) {
        return apr_pstrdup(p, "/");
    }
    *slash = '\0';
    return copy;
}

/* Whether `app_root` holds an app the core would find: the startup file the configuration names,
 * a generic app's command, or one of the files detect.py looks for. */
int am_detect_app(apr_pool_t *p, const char *app_root, const am_dir_conf *conf)
{
    const char *const *name;
    struct stat st;

    if (conf->value[AM_S_APP_START_COMMAND] != NULL) {
        return 1;
    }
    if (conf->value[AM_S_STARTUP_FILE] != NULL) {
        const char *file = conf->value[AM_S_STARTUP_FILE];
        if (file[0] != '/') {
            file = apr_pstrcat(p, app_root, "/", file, NULL);
        }
        return stat(file, &st) == 0 && S_ISREG(st.st_mode);
    }
    for (name = am_startup_files; *name; name++) {
        if (stat(apr_pstrcat(p, app_root, "/", *name, NULL), &st) == 0 && S_ISREG(st.st_mode)) {
            return 1;
        }
    }
    return 0;
}

/* The "&key=value..." part of !~App for the settings of `conf`, in the table's order, so that the
 * same configuration always gives the same string. */
static void am_compute_fields(apr_pool_t *p, am_dir_conf *conf)
{
    apr_array_header_t *parts = apr_array_make(p, 16, sizeof(const char *));
    int id, i;

    for (id = 0; id < AM_NSETTINGS; id++) {
        const am_setting *s = &am_settings[id];
        if (s->role != AM_ROLE_APP || id == AM_S_APP_ROOT) {
            continue;
        }
        if (conf->values[id] != NULL) {
            for (i = 0; i < conf->values[id]->nelts; i++) {
                const char *item = APR_ARRAY_IDX(conf->values[id], i, const char *);
                APR_ARRAY_PUSH(parts, const char *) =
                    apr_pstrcat(p, "&", s->name, "=", am_encode(p, item), NULL);
            }
        }
        else if (conf->value[id] != NULL) {
            APR_ARRAY_PUSH(parts, const char *) =
                apr_pstrcat(p, "&", s->name, "=", am_encode(p, conf->value[id]), NULL);
        }
    }
    conf->app_fields = apr_array_pstrcat(p, parts, '\0');
    conf->app_root_field = conf->value[AM_S_APP_ROOT] != NULL
                               ? am_app_root_field(p, conf->value[AM_S_APP_ROOT])
                               : NULL;
    conf->has_app_settings = parts->nelts > 0 || conf->app_root_field != NULL;
}

/* The inner scope's settings win; repeatable settings (environment variables) add up, outer ones
 * first, so that an inner NAME replaces an outer one in the core (the last pair wins there). */
void *am_merge_dir_conf(apr_pool_t *p, void *basev, void *addv)
{
    const am_dir_conf *base = basev, *add = addv;
    am_dir_conf *conf = apr_pcalloc(p, sizeof(*conf));
    int id;

    for (id = 0; id < AM_NSETTINGS; id++) {
        conf->value[id] = add->value[id] != NULL ? add->value[id] : base->value[id];
        if (base->values[id] != NULL && add->values[id] != NULL) {
            conf->values[id] = apr_array_append(p, base->values[id], add->values[id]);
        }
        else {
            conf->values[id] = add->values[id] != NULL ? add->values[id] : base->values[id];
        }
    }
    /* Apache merges per request for <Directory> and <Location> sections; most of them set no
     * app setting (a Require, an Options), and then the fields are those of the other side. */
    if (!add->has_app_settings || !base->has_app_settings) {
        const am_dir_conf *from = add->has_app_settings ? add : base;
        conf->app_fields = from->app_fields;
        conf->app_root_field = from->app_root_field;
        conf->has_app_settings = from->has_app_settings;
    }
    else {
        am_compute_fields(p, conf);
    }
    return conf;
}

void *am_create_server_conf(apr_pool_t *p, server_rec *s)
{
    am_server_conf *conf = apr_pcalloc(p, sizeof(*conf));
    (void)s;
    conf->settings = am_create_dir_conf(p, NULL);
    return conf;
}

void *am_merge_server_conf(apr_pool_t *p, void *basev, void *addv)
{
    const am_server_conf *base = basev, *add = addv;
    am_server_conf *conf = apr_pcalloc(p, sizeof(*conf));
    conf->settings = am_merge_dir_conf(p, base->settings, add->settings);
    return conf;
}

static const char *am_fail(cmd_parms *cmd, const char *reason)
{
    return apr_psprintf(cmd->pool, "%s: %s", cmd->cmd->name, reason);
}

static const char *am_check_number(cmd_parms *cmd, const am_setting *s, const char *text)
{
    char *end;
    double number;

    errno = 0;
    if (s->kind == AM_INT) {
        long n = strtol(text, &end, 10);
        number = (double)n;
        if (end == text || *end != '\0' || errno != 0) {
            return am_fail(cmd, apr_psprintf(cmd->pool, "must be an integer, got '%s'", text));
        }
    }
    else {
        number = strtod(text, &end);
        if (end == text || *end != '\0' || errno != 0 || !isfinite(number)) {
            return am_fail(cmd, apr_psprintf(cmd->pool, "must be a number, got '%s'", text));
        }
    }
    if (s->check == AM_CHECK_MIN && number < s->minimum) {
        return am_fail(cmd, apr_psprintf(cmd->pool, "must be at least %g, got %s", s->minimum,
                                         text));
    }
    if (s->check == AM_CHECK_PORT && (number < 1 || number > 65535)) {
        return am_fail(cmd, apr_psprintf(cmd->pool, "must be between 1 and 65535, got %s", text));
    }
    return NULL;
}

/* "wsgi|asgi|rack" as "wsgi, asgi, rack", for messages. */
static const char *am_list_choices(apr_pool_t *p, const char *choices)
{
    apr_array_header_t *parts = apr_array_make(p, 8, sizeof(const char *));
    const char *rest = choices;

    while (rest != NULL) {
        const char *bar = strchr(rest, '|');
        APR_ARRAY_PUSH(parts, const char *) =
            bar != NULL ? apr_pstrmemdup(p, rest, bar - rest) : rest;
        if (bar != NULL) {
            APR_ARRAY_PUSH(parts, const char *) = ", ";
        }
        rest = bar != NULL ? bar + 1 : NULL;
    }
    return apr_array_pstrcat(p, parts, '\0');
}

static const char *am_check_choice(cmd_parms *cmd, const am_setting *s, const char *text)
{
    const char *rest = s->choices;

    while (rest != NULL && *rest) {
        const char *bar = strchr(rest, '|');
        apr_size_t len = bar != NULL ? (apr_size_t)(bar - rest) : strlen(rest);
        if (strlen(text) == len && strncmp(text, rest, len) == 0) {
            return NULL;
        }
        rest = bar != NULL ? bar + 1 : NULL;
    }
    return am_fail(cmd, apr_psprintf(cmd->pool, "must be one of %s, got '%s'",
                                     am_list_choices(cmd->pool, s->choices), text));
}

/* The checks of appmanager/settings.py, repeated so that Apache refuses a bad value when it
 * reads its configuration rather than the core answering 500 later. */
static const char *am_check_value(cmd_parms *cmd, const am_setting *s, const char *text)
{
    switch (s->check) {
    case AM_CHECK_NONEMPTY: {
        const char *c = text;
        while (apr_isspace(*c)) {
            c++;
        }
        if (!*c) {
            return am_fail(cmd, "must not be empty");
        }
        break;
    }
    case AM_CHECK_URI_PATH:
        if (text[0] != '/' || strchr(text, '?') != NULL || strchr(text, '#') != NULL) {
            return am_fail(cmd, apr_psprintf(cmd->pool,
                                             "must be a path starting with /, got '%s'", text));
        }
        break;
    case AM_CHECK_USER: {
        struct passwd *pw = getpwnam(text);
        if (pw == NULL) {
            return am_fail(cmd, apr_psprintf(cmd->pool, "user '%s' does not exist", text));
        }
        if (pw->pw_uid == 0) {
            return am_fail(cmd, "apps never run as root");
        }
        if (geteuid() != 0 && pw->pw_uid != geteuid()) {
            return am_fail(cmd, "running an app as another user needs Apache to start as root");
        }
        break;
    }
    case AM_CHECK_GROUP: {
        struct group *gr = getgrnam(text);
        if (gr == NULL) {
            return am_fail(cmd, apr_psprintf(cmd->pool, "group '%s' does not exist", text));
        }
        if (gr->gr_gid == 0) {
            return am_fail(cmd, "apps never run as group root");
        }
        if (geteuid() != 0 && gr->gr_gid != getegid()) {
            return am_fail(cmd, "running an app as another group needs Apache to start as root");
        }
        break;
    }
    case AM_CHECK_READABLE_FILE: {
        struct stat st;
        if (stat(text, &st) != 0 || !S_ISREG(st.st_mode)) {
            return am_fail(cmd, apr_psprintf(cmd->pool, "file %s does not exist", text));
        }
        if (access(text, R_OK) != 0) {
            return am_fail(cmd, apr_psprintf(cmd->pool, "file %s is not readable", text));
        }
        break;
    }
    case AM_CHECK_HOST_PORT: {
        const char *colon = strrchr(text, ':');
        const char *d;
        long port;
        int ok = colon != NULL && colon != text && colon[1] != '\0';
        for (d = ok ? colon + 1 : ""; ok && *d; d++) {
            ok = apr_isdigit(*d);
        }
        port = ok ? strtol(colon + 1, NULL, 10) : 0;
        if (!ok || port < 1 || port > 65535) {
            return am_fail(cmd, apr_psprintf(cmd->pool, "must be HOST:PORT, got '%s'", text));
        }
        break;
    }
    case AM_CHECK_URL:
        if (strncmp(text, "http://", 7) != 0 && strncmp(text, "https://", 8) != 0) {
            return am_fail(cmd, apr_psprintf(cmd->pool,
                                             "must be an http:// or https:// URL, got '%s'",
                                             text));
        }
        break;
    default:
        break;
    }
    if (s->kind == AM_INT || s->kind == AM_FLOAT) {
        return am_check_number(cmd, s, text);
    }
    if (s->choices != NULL) {
        return am_check_choice(cmd, s, text);
    }
    return NULL;
}

/* Paths Apache's way: relative to ServerRoot. app_root and files the core reads on the
 * configuration's behalf; not startup_file or restart_dir (relative to the app root), nor
 * interpreters and commands (looked up on the PATH). */
static int am_server_relative(am_setting_id id)
{
    const am_setting *s = &am_settings[id];
    if (s->kind != AM_PATH) {
        return 0;
    }
    return id == AM_S_APP_ROOT || s->check == AM_CHECK_READABLE_FILE || s->role == AM_ROLE_CORE
           || id == AM_S_CORE_SOCKET;
}

/* Passenger's PassengerLogLevel is a number (0 critical ... 3 notice, its default ... 7 debug). */
static const char *am_passenger_log_level(int level)
{
    if (level <= 1) {
        return "error";
    }
    if (level == 2) {
        return "warning";
    }
    return level <= 4 ? "info" : "debug";
}

static const char *am_word_count_error(cmd_parms *cmd, const am_setting *s)
{
    switch (s->kind) {
    case AM_BOOL:
        return am_fail(cmd, "takes one argument, On or Off");
    case AM_ENV:
        return am_fail(cmd, "takes two arguments, a variable's NAME and its VALUE");
    case AM_LIST:
        return am_fail(cmd, "takes one or more arguments");
    default:
        return am_fail(cmd, "takes one argument");
    }
}

/* The handler of every AppManager* and mapped Passenger* directive; cmd->info is the setting's
 * id. Arguments are split here (RAW_ARGS) so that one handler serves every kind. */
const char *am_cmd_setting(cmd_parms *cmd, void *dir_conf, const char *args)
{
    am_setting_id id = (am_setting_id)(apr_uintptr_t)cmd->info;
    const am_setting *s = &am_settings[id];
    am_dir_conf *conf = dir_conf;
    apr_array_header_t *words = apr_array_make(cmd->temp_pool, 2, sizeof(char *));
    const char *err;
    char *word;
    int i;

    if (s->role == AM_ROLE_CORE || id == AM_S_CORE_SOCKET || id == AM_S_CORE_COMMAND) {
        /* One core per Apache: its settings belong to the main server. */
        if ((err = ap_check_cmd_context(cmd, GLOBAL_ONLY)) != NULL) {
            return err;
        }
    }
    if (cmd->path == NULL) {
        /* Server or virtual host scope: the record is the server's. */
        am_server_conf *sconf = ap_get_module_config(cmd->server->module_config,
                                                     &appmanager_module);
        if (s->role != AM_ROLE_APP && id != AM_S_ENABLED && id != AM_S_REQUEST_BUFFERING) {
            conf = sconf->settings;
        }
    }
    for (;;) {
        /* Not until an empty word: `""` is an argument, and an empty one. */
        while (apr_isspace(*args)) {
            args++;
        }
        if (!*args) {
            break;
        }
        APR_ARRAY_PUSH(words, char *) = ap_getword_conf(cmd->pool, &args);
    }
    if ((s->kind == AM_ENV && words->nelts != 2) || (s->kind == AM_LIST && words->nelts < 1)
        || (s->kind != AM_ENV && s->kind != AM_LIST && words->nelts != 1)) {
        return am_word_count_error(cmd, s);
    }
    word = APR_ARRAY_IDX(words, 0, char *);

    if (s->kind == AM_BOOL) {
        if (strcasecmp(word, "on") == 0) {
            conf->value[id] = "on";
        }
        else if (strcasecmp(word, "off") == 0) {
            conf->value[id] = "off";
        }
        else {
            return am_fail(cmd, apr_psprintf(cmd->pool, "must be On or Off, got '%s'", word));
        }
    }
    else if (s->kind == AM_ENV) {
        const char *value = APR_ARRAY_IDX(words, 1, char *);
        if (!*word || strchr(word, '=') != NULL) {
            return am_fail(cmd, apr_psprintf(cmd->pool, "invalid variable name '%s'", word));
        }
        if (conf->values[id] == NULL) {
            conf->values[id] = apr_array_make(cmd->pool, 4, sizeof(const char *));
        }
        APR_ARRAY_PUSH(conf->values[id], const char *) =
            apr_pstrcat(cmd->pool, word, "=", value, NULL);
    }
    else if (s->kind == AM_LIST) {
        if (conf->values[id] == NULL) {
            conf->values[id] = apr_array_make(cmd->pool, 4, sizeof(const char *));
        }
        for (i = 0; i < words->nelts; i++) {
            const char *item = APR_ARRAY_IDX(words, i, char *);
            if ((err = am_check_value(cmd, s, item)) != NULL) {
                return err;
            }
            APR_ARRAY_PUSH(conf->values[id], const char *) = item;
        }
    }
    else {
        if (id == AM_S_LOG_LEVEL && strncmp(cmd->cmd->name, "Passenger", 9) == 0
            && apr_isdigit(word[0]) && word[1] == '\0') {
            word = (char *)am_passenger_log_level(word[0] - '0');
        }
        if (am_server_relative(id)) {
            const char *path = ap_server_root_relative(cmd->pool, word);
            if (path == NULL) {
                return am_fail(cmd, apr_psprintf(cmd->pool, "invalid path '%s'", word));
            }
            word = apr_pstrdup(cmd->pool, path);
        }
        if ((err = am_check_value(cmd, s, word)) != NULL) {
            return err;
        }
        conf->value[id] = word;
    }
    am_compute_fields(cmd->pool, conf);
    return NULL;
}

/* Passenger directives about Passenger's own installation (PassengerRoot, PassengerDefaultRuby,
 * ...) have no counterpart: they are accepted and have no effect, so that a Passenger virtual
 * host works unchanged. */
const char *am_cmd_ignored(cmd_parms *cmd, void *dir_conf, const char *args)
{
    (void)dir_conf;
    (void)args;
    ap_log_error(APLOG_MARK, APLOG_DEBUG, 0, cmd->server,
                 "mod_appmanager: %s has no effect with appmanager", cmd->cmd->name);
    return NULL;
}
