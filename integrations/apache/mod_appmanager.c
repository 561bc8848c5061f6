/* mod_appmanager: Apache's connector to the appmanager core (docs/protocol/connector.md).
 *
 * The module does three things: it reads the AppManager* directives (and their Passenger*
 * names), it starts the core with Apache (am_core.c), and it hands each request of an app to
 * the core's Unix socket. The transport is mod_proxy_http's: in a fixups hook that runs before
 * mod_proxy's, an app's request becomes a reverse-proxy request to "unix:<socket>|http://...",
 * and a connection pool (a proxy worker this module defines for the socket) keeps connections
 * to the core open between requests. What the module adds is what makes it a connector: the
 * !~App and !~Client fields, which clients cannot forge because every client header whose
 * name begins with "!~" is dropped first.
 *
 * Static files: a request whose file exists under the DocumentRoot (an app's public/
 * directory) is left to Apache, as Passenger does.
 */

#include "am_apache.h"

#include "http_core.h"
#include "http_log.h"
#include "http_protocol.h"
#include "http_request.h"
#include "ap_mpm.h"
#include "apr_strings.h"
#include "mod_proxy.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

APLOG_USE_MODULE(appmanager);

/* The host name in the URLs handed to mod_proxy. It names the connection pool of the core's
 * socket (a worker of its own, so that no ProxyPass of the configuration can share it) and is
 * never resolved: the app sees the client's Host (see am_proxy_fixups). */
#define AM_PROXY_HOST "appmanager-core"
#define AM_PROXY_URL_HOST "|http://" AM_PROXY_HOST

/* Seconds an idle pooled connection is kept: below the core's own idle timeout (75 s), so that
 * Apache closes first and never sends a request on a connection the core is closing. */
#define AM_POOL_TTL 60

/* The socket of the core for this configuration, and its secret, set in post_config. */
static const char *am_socket;
static const char *am_secret;
/* mod_env, whose SetEnv variables go to the app's environment (am_setenv_fields). */
static module *am_env_module;

/* mod_env's per-directory record (modules/metadata/mod_env.c): its first member is the table of
 * SetEnv and PassEnv variables. mod_env offers no accessor; the layout is unchanged across 2.4. */
typedef struct {
    apr_table_t *vars;
} am_mod_env_conf;

/* What the proxy fixups hook needs from the fixups hook, per request. */
typedef struct {
    apr_table_t *client_headers; /* the client's headers (without the "!~" ones) */
} am_request;

/* Per-setting constants for the command table, which needs constant expressions. */
enum {
#define AM_SETTING(id, name, kind, role, check, minimum, choices) id##_ROLE = (int)(role),
#include "appmanager_directives.def"
#undef AM_SETTING
};

/* Where a directive may appear: app settings, AppManagerEnabled and AppManagerRequestBuffering
 * in any scope; the core's settings at server level (am_cmd_setting also refuses them in
 * virtual hosts: one core serves all of Apache). */
#define AM_WHERE(id)                                                                     \
    ((id##_ROLE == (int)AM_ROLE_CORE || (id) == AM_S_CORE_SOCKET || (id) == AM_S_CORE_COMMAND) \
         ? RSRC_CONF                                                                     \
         : RSRC_CONF | ACCESS_CONF)

static const command_rec am_commands[] = {
#define AM_DIRECTIVE(id, nginx_name, apache_name)                                      \
    AP_INIT_RAW_ARGS(apache_name, am_cmd_setting, (void *)(id), AM_WHERE(id),          \
                     "appmanager setting " nginx_name " (see appmanager's docs/settings.md)"),
#include "appmanager_directives.def"
#undef AM_DIRECTIVE
#define AM_IGNORED(name)                                                                 \
    AP_INIT_RAW_ARGS(name, am_cmd_ignored, NULL, RSRC_CONF | ACCESS_CONF | OR_ALL,     \
                     "Passenger's; no effect with appmanager"),
    AM_IGNORED("PassengerRoot")
    AM_IGNORED("PassengerDefaultRuby")
    AM_IGNORED("PassengerDefaultUser")
    AM_IGNORED("PassengerDefaultGroup")
    AM_IGNORED("PassengerInstanceRegistryDir")
    AM_IGNORED("PassengerDataBufferDir")
    AM_IGNORED("PassengerHighPerformance")
    AM_IGNORED("PassengerBufferResponse")
    AM_IGNORED("PassengerBufferUpload")
    AM_IGNORED("PassengerStatThrottleRate")
    AM_IGNORED("PassengerResolveSymlinksInDocumentRoot")
    AM_IGNORED("PassengerAllowEncodedSlashes")
    AM_IGNORED("PassengerErrorOverride")
    AM_IGNORED("PassengerLoadShellEnvvars")
    AM_IGNORED("PassengerShowVersionInHeader")
    AM_IGNORED("PassengerDisableSecurityUpdateCheck")
    AM_IGNORED("PassengerSecurityUpdateCheckProxy")
    AM_IGNORED("PassengerDisableAnonymousTelemetry")
    AM_IGNORED("PassengerAnonymousTelemetryProxy")
    AM_IGNORED("PassengerAppGroupName")
    AM_IGNORED("PassengerStickySessions")
    AM_IGNORED("PassengerStickySessionsCookieName")
    AM_IGNORED("PassengerSocketBacklog")
    AM_IGNORED("PassengerTurbocaching")
    AM_IGNORED("PassengerUseGlobalQueue")
    AM_IGNORED("PassengerDisableLogPrefix")
    AM_IGNORED("PassengerFileDescriptorLogFile")
    AM_IGNORED("PassengerResponseBufferHighWatermark")
#undef AM_IGNORED
    {NULL}};

/* The app root and whether an app is there, for a request whose scope sets no app_root: the
 * parent of the DocumentRoot, computed once per virtual host in post_config (again here only
 * when something like mod_vhost_alias gives this request a DocumentRoot of its own). */
static const char *am_default_root_field(request_rec *r, const am_dir_conf *dc, int *detected)
{
    am_server_conf *sc = ap_get_module_config(r->server->module_config, &appmanager_module);
    const char *docroot = ap_document_root(r);
    const char *root;

    if (docroot == sc->document_root && sc->default_root_field != NULL) {
        *detected = sc->app_detected;
        return sc->default_root_field;
    }
    root = am_parent_dir(r->pool, docroot);
    *detected = am_detect_app(r->pool, root, dc);
    return am_app_root_field(r->pool, root);
}

/* SetEnv/PassEnv variables of this request's scope as "&env_var=NAME%3DVALUE..." (they are
 * configuration, the same for every request of a scope; SetEnvIf's are not included). */
static const char *am_setenv_fields(request_rec *r)
{
    const am_mod_env_conf *ec;
    const apr_array_header_t *arr;
    const apr_table_entry_t *e;
    apr_array_header_t *parts;
    int i;

    if (am_env_module == NULL) {
        return "";
    }
    ec = ap_get_module_config(r->per_dir_config, am_env_module);
    if (ec == NULL || ec->vars == NULL || apr_is_empty_table(ec->vars)) {
        return "";
    }
    arr = apr_table_elts(ec->vars);
    e = (const apr_table_entry_t *)arr->elts;
    parts = apr_array_make(r->pool, arr->nelts, sizeof(const char *));
    for (i = 0; i < arr->nelts; i++) {
        if (e[i].key != NULL && e[i].val != NULL) {
            APR_ARRAY_PUSH(parts, const char *) = apr_pstrcat(
                r->pool, "&env_var=", am_encode(r->pool, apr_pstrcat(r->pool, e[i].key, "=",
                                                                     e[i].val, NULL)),
                NULL);
        }
    }
    return apr_array_pstrcat(r->pool, parts, '\0');
}

/* Drop every client header whose name begins with "!~": only this module writes those. */
static void am_drop_forged_fields(request_rec *r)
{
    const apr_array_header_t *arr = apr_table_elts(r->headers_in);
    const apr_table_entry_t *e = (const apr_table_entry_t *)arr->elts;
    apr_array_header_t *names = NULL;
    int i;

    for (i = 0; i < arr->nelts; i++) {
        if (e[i].key != NULL && e[i].key[0] == '!' && e[i].key[1] == '~') {
            if (names == NULL) {
                names = apr_array_make(r->pool, 2, sizeof(const char *));
            }
            APR_ARRAY_PUSH(names, const char *) = e[i].key;
        }
    }
    for (i = 0; names != NULL && i < names->nelts; i++) {
        apr_table_unset(r->headers_in, APR_ARRAY_IDX(names, i, const char *));
    }
}

/* Is this a file Apache serves itself: an existing file, or a directory with an index.html? */
static int am_is_static(request_rec *r)
{
    if (r->finfo.filetype == APR_REG) {
        return r->path_info == NULL || r->path_info[0] == '\0';
    }
    if (r->finfo.filetype == APR_DIR && r->filename != NULL) {
        struct stat st;
        const char *index = apr_pstrcat(r->pool, r->filename,
                                        r->filename[strlen(r->filename) - 1] == '/' ? "" : "/",
                                        "index.html", NULL);
        return stat(index, &st) == 0 && S_ISREG(st.st_mode);
    }
    return 0;
}

/* The path and query as the client sent them (connector.md: not decoded), or NULL when a module
 * rewrote them (mod_rewrite's [PT], for one): Apache decodes and normalizes r->uri in place,
 * in the string of r->parsed_uri.path, so a different string means a rewrite. The origin form
 * of an absolute-form target ("GET http://host/path") is its path and query. */
static const char *am_raw_target(request_rec *r)
{
    const char *target = r->unparsed_uri;

    if (r->uri != r->parsed_uri.path || r->args != r->parsed_uri.query || target == NULL) {
        return NULL;
    }
    if (target[0] != '/') {
        const char *authority = ap_strstr_c(target, "://");
        target = authority != NULL ? ap_strchr_c(authority + 3, '/') : NULL;
    }
    return target;
}

/* The request path: decide whether the request is an app's, and if so make it a reverse-proxy
 * request to the core with the connector fields attached. */
static int am_fixups(request_rec *r)
{
    const am_dir_conf *dc = ap_get_module_config(r->per_dir_config, &appmanager_module);
    const char *enabled = dc->value[AM_S_ENABLED];
    const char *root_field = dc->app_root_field;
    const char *buffering = dc->value[AM_S_REQUEST_BUFFERING];
    int detected = 1;
    const char *target;
    am_request *req;
    apr_port_t client_port, local_port;

    if (am_socket == NULL || r->proxyreq != PROXYREQ_NONE) {
        return DECLINED;
    }
    if (enabled != NULL && strcmp(enabled, "off") == 0) {
        return DECLINED;
    }
    if (root_field == NULL) {
        root_field = am_default_root_field(r, dc, &detected);
    }
    if (enabled == NULL && !detected) {
        /* Neither AppManagerEnabled nor an app root, and no app beside the DocumentRoot. */
        return DECLINED;
    }
    if (am_is_static(r)) {
        return DECLINED;
    }

    am_drop_forged_fields(r);
    req = apr_palloc(r->pool, sizeof(*req));
    req->client_headers = r->headers_in;
    ap_set_module_config(r->request_config, &appmanager_module, req);

    apr_table_setn(r->headers_in, "!~App",
                   apr_pstrcat(r->pool, root_field, am_setenv_fields(r), dc->app_fields, NULL));
    client_port = r->useragent_addr != NULL ? r->useragent_addr->port : 0;
    local_port = r->connection->local_addr != NULL ? r->connection->local_addr->port : 0;
    apr_table_setn(r->headers_in, "!~Client",
                   apr_psprintf(r->pool, "%s %u %s %u %s", r->useragent_ip,
                                (unsigned)client_port,
                                r->server->server_hostname ? r->server->server_hostname
                                                           : "localhost",
                                (unsigned)local_port, ap_http_scheme(r)));

    /* mod_proxy_http sends a chunked body as it comes unless told to spool it and send its
     * Content-Length; bodies of known length are passed on as they arrive either way. */
    if (buffering == NULL || strcmp(buffering, "on") == 0) {
        apr_table_setn(r->subprocess_env, "proxy-sendcl", "1");
    }

    target = am_raw_target(r);
    if (target != NULL) {
        /* The request target as the client sent it, untouched by mod_proxy_http. */
        r->filename = apr_pstrcat(r->pool, "proxy:unix:", am_socket, AM_PROXY_URL_HOST, target,
                                  NULL);
        apr_table_setn(r->notes, "proxy-nocanon", "1");
    }
    else {
        /* Rewritten: the path as rewritten (decoded), which mod_proxy_http encodes again, and
         * to which it appends the query (r->args) itself. */
        r->filename = apr_pstrcat(r->pool, "proxy:unix:", am_socket, AM_PROXY_URL_HOST, r->uri,
                                  NULL);
    }
    r->proxyreq = PROXYREQ_REVERSE;
    r->handler = "proxy-server";
    /* Not a file any more: keeps mod_dir from redirecting or looking for index files. */
    r->finfo.filetype = APR_NOFILE;
    return OK;
}

/* mod_proxy_http's last look at the head it sends (r->headers_in is its copy here): the core's
 * secret, the client's own Host, and X-Forwarded-* and Via as the client sent them, for the core
 * passes the client's headers to the app unchanged (connector.md). */
static int am_proxy_fixups(request_rec *r)
{
    static const char *const added[] = {"X-Forwarded-For", "X-Forwarded-Host",
                                        "X-Forwarded-Server", "Via", NULL};
    const am_request *req = ap_get_module_config(r->request_config, &appmanager_module);
    const char *const *name;
    const apr_array_header_t *arr;
    const apr_table_entry_t *e;
    const char *host;
    int i;

    if (req == NULL) {
        return DECLINED;
    }
    host = apr_table_get(req->client_headers, "Host");
    if (host == NULL) {
        host = r->server->server_hostname ? r->server->server_hostname : "localhost";
    }
    apr_table_setn(r->headers_in, "Host", host);
    /* Only in the head sent to the core, never in the request's own headers (which other
     * modules may log or pass on). */
    if (am_secret != NULL) {
        apr_table_setn(r->headers_in, "!~Secret", am_secret);
    }
    for (name = added; *name; name++) {
        apr_table_unset(r->headers_in, *name);
    }
    arr = apr_table_elts(req->client_headers);
    e = (const apr_table_entry_t *)arr->elts;
    for (i = 0; i < arr->nelts; i++) {
        for (name = added; e[i].key != NULL && *name; name++) {
            if (strcasecmp(e[i].key, *name) == 0) {
                apr_table_addn(r->headers_in, e[i].key, e[i].val);
            }
        }
    }
    return OK;
}

/* mod_proxy's functions, looked up when the configuration is read rather than linked: Apache
 * loads modules in the configuration's order (Debian's a2enmod sorts appmanager before proxy),
 * and mod_proxy's symbols must not be needed before mod_proxy is loaded. */
typedef char *(*am_define_worker_fn)(apr_pool_t *, proxy_worker **, proxy_balancer *,
                                     proxy_server_conf *, const char *, int);

/* A connection pool to the core's socket in every virtual host: mod_proxy's default reverse
 * worker would open a new connection per request. */
static const char *am_define_workers(apr_pool_t *pconf, server_rec *main_server,
                                     module *proxy_module_p)
{
    am_define_worker_fn define_worker =
        (am_define_worker_fn)dlsym(RTLD_DEFAULT, "ap_proxy_define_worker");
    const char *url = apr_pstrcat(pconf, "unix:", am_socket, AM_PROXY_URL_HOST, "/", NULL);
    server_rec *s;

    if (define_worker == NULL) {
        return "mod_proxy does not export ap_proxy_define_worker";
    }
    for (s = main_server; s != NULL; s = s->next) {
        proxy_server_conf *pc = ap_get_module_config(s->module_config, proxy_module_p);
        proxy_worker *worker = NULL;
        char *err = define_worker(pconf, &worker, NULL, pc, url, 0);
        if (err != NULL) {
            return apr_pstrcat(pconf, "cannot define the proxy worker for ", am_socket, ": ",
                               err, NULL);
        }
        /* Never put the core out of service after a failed connection (mod_proxy's default
         * is 60 s): the next request tries again. */
        worker->s->retry = 0;
        worker->s->retry_set = 1;
        worker->s->status |= PROXY_WORKER_IGNORE_ERRORS;
        worker->s->ttl = apr_time_from_sec(AM_POOL_TTL);
    }
    return NULL;
}

/* Per virtual host, the default app root (the parent of DocumentRoot) and whether an app is
 * there, so that requests need no file-system lookups to find them. */
static void am_compute_defaults(apr_pool_t *pconf, server_rec *main_server)
{
    server_rec *s;

    for (s = main_server; s != NULL; s = s->next) {
        am_server_conf *sc = ap_get_module_config(s->module_config, &appmanager_module);
        core_server_config *core = ap_get_core_module_config(s->module_config);
        const am_dir_conf *dc = ap_get_module_config(s->lookup_defaults, &appmanager_module);
        const char *root;

        if (core->ap_document_root == NULL) {
            continue;
        }
        root = am_parent_dir(pconf, core->ap_document_root);
        sc->document_root = core->ap_document_root;
        sc->default_root_field = am_app_root_field(pconf, root);
        sc->app_detected = am_detect_app(pconf, root, dc);
    }
}

/* What can be checked before anything starts, so that `apache2 -t` reports it too. */
static int am_check_config(apr_pool_t *pconf, apr_pool_t *plog, apr_pool_t *ptemp,
                           server_rec *s)
{
    am_server_conf *sc = ap_get_module_config(s->module_config, &appmanager_module);
    const char *command = sc->settings->value[AM_S_CORE_COMMAND];

    (void)pconf;
    (void)plog;
    (void)ptemp;
    if (ap_find_linked_module("mod_proxy.c") == NULL
        || ap_find_linked_module("mod_proxy_http.c") == NULL) {
        ap_log_error(APLOG_MARK, APLOG_STARTUP | APLOG_EMERG, 0, s,
                     "mod_appmanager needs mod_proxy and mod_proxy_http: load them "
                     "(LoadModule proxy_module .../mod_proxy.so, "
                     "LoadModule proxy_http_module .../mod_proxy_http.so)");
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    if (sc->settings->value[AM_S_CORE_SOCKET] == NULL && command != NULL
        && strchr(command, '/') != NULL && access(command, X_OK) != 0) {
        ap_log_error(APLOG_MARK, APLOG_STARTUP | APLOG_EMERG, 0, s,
                     "AppManagerCoreCommand: %s is not an executable file", command);
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    return OK;
}

static int am_post_config(apr_pool_t *pconf, apr_pool_t *plog, apr_pool_t *ptemp,
                          server_rec *s)
{
    static const char first_pass_key[] = "appmanager-first-pass";
    am_server_conf *sc = ap_get_module_config(s->module_config, &appmanager_module);
    module *proxy_module_p = ap_find_linked_module("mod_proxy.c");
    am_core_info info;
    const char *err;
    void *seen = NULL;

    (void)plog;
    am_socket = NULL;
    am_secret = NULL;
    am_env_module = ap_find_linked_module("mod_env.c");

    /* Apache reads its configuration twice when it starts, and only the second reading runs
     * (the first process detaches unless in the foreground): start the core then. */
    apr_pool_userdata_get(&seen, first_pass_key, s->process->pool);
    if (seen == NULL) {
        apr_pool_userdata_set((const void *)1, first_pass_key, apr_pool_cleanup_null,
                              s->process->pool);
        return OK;
    }
    err = am_core_ensure(pconf, ptemp, s, sc->settings, &info);
    if (err != NULL) {
        ap_log_error(APLOG_MARK, APLOG_EMERG, 0, s, "mod_appmanager: %s", err);
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    am_socket = info.socket;
    am_secret = info.secret;
    if ((err = am_define_workers(pconf, s, proxy_module_p)) != NULL) {
        ap_log_error(APLOG_MARK, APLOG_EMERG, 0, s, "mod_appmanager: %s", err);
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    am_compute_defaults(pconf, s);
    return OK;
}

static void am_register_hooks(apr_pool_t *p)
{
    /* After mod_rewrite's per-directory rules, before mod_proxy turns r->filename into a
     * request to the core. */
    static const char *const pre[] = {"mod_rewrite.c", NULL};
    static const char *const succ[] = {"mod_proxy.c", NULL};

    (void)p;
    ap_hook_check_config(am_check_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_post_config(am_post_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_fixups(am_fixups, pre, succ, APR_HOOK_FIRST);
    APR_OPTIONAL_HOOK(proxy, fixups, am_proxy_fixups, NULL, NULL, APR_HOOK_MIDDLE);
}

module AP_MODULE_DECLARE_DATA appmanager_module = {
    STANDARD20_MODULE_STUFF,
    am_create_dir_conf,    /* per-directory config: app settings, enabled, request buffering */
    am_merge_dir_conf,     /* inner scopes over outer ones; recomputes !~App's fixed part */
    am_create_server_conf, /* per-server config: the core's settings (main server only) */
    am_merge_server_conf,
    am_commands,           /* AppManager* and Passenger* directives */
    am_register_hooks
};
