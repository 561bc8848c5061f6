/*
 * appmanager's nginx module: the wiring. The command table comes from the
 * settings registry through integrations/appmanager_directives.def, so every
 * directive, its arguments, its levels and its checks are declared once, in
 * appmanager/settings.py.
 */

#include "ngx_http_appmanager_module.h"


static void *ngx_http_appmanager_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_appmanager_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_appmanager_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_appmanager_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_appmanager_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_appmanager_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_appmanager_init_process(ngx_cycle_t *cycle);


/* Each setting's kind and role as constants, for the command flags below. */
enum {
#define AM_SETTING(id, name, kind, role, check, minimum, choices)             \
    id##_KIND = kind, id##_ROLE = role,
#include <appmanager_directives.def>
#undef AM_SETTING
    NGX_HTTP_APPMANAGER_KIND_END
};


ngx_http_appmanager_setting_t  ngx_http_appmanager_settings[] = {
#define AM_SETTING(id, name, kind, role, check, minimum, choices)             \
    { ngx_string(name), kind, role, check, minimum, choices },
#include <appmanager_directives.def>
#undef AM_SETTING
};


#define NGX_HTTP_APPMANAGER_ANY_LEVEL                                         \
    (NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF)

/*
 * The module's own switches for a request (enabled, request_buffering) may sit
 * in an "if" inside a location, as Passenger's do; the socket and the command
 * that starts the core are one per nginx, like the core's own settings.
 */
#define ngx_http_appmanager_levels(id, role)                                  \
    ((int) (role) == AM_ROLE_APP ? NGX_HTTP_APPMANAGER_ANY_LEVEL              \
     : (int) (role) == AM_ROLE_CORE ? NGX_HTTP_MAIN_CONF                      \
     : ((int) (id) == AM_S_CORE_SOCKET || (int) (id) == AM_S_CORE_COMMAND)    \
       ? NGX_HTTP_MAIN_CONF                                                   \
     : NGX_HTTP_APPMANAGER_ANY_LEVEL|NGX_HTTP_LIF_CONF)

#define ngx_http_appmanager_args(kind)                                        \
    ((int) (kind) == AM_BOOL ? NGX_CONF_FLAG                                  \
     : (int) (kind) == AM_ENV ? NGX_CONF_TAKE2 : NGX_CONF_TAKE1)

/*
 * Passenger directives about Passenger's own installation and tuning, with no
 * counterpart here: accepted and ignored, so that a Passenger configuration
 * works unchanged once the module is swapped.
 */
#define ngx_http_appmanager_passenger_only(name)                              \
    { ngx_string(name), NGX_HTTP_APPMANAGER_ANY_LEVEL|NGX_CONF_ANY,           \
      ngx_http_appmanager_ignore, 0, 0, NULL },


static ngx_command_t  ngx_http_appmanager_commands[] = {

#define AM_DIRECTIVE(id, nginx_name, apache_name)                             \
    { ngx_string(nginx_name),                                                 \
      ngx_http_appmanager_levels(id, id##_ROLE)                               \
      | ngx_http_appmanager_args(id##_KIND),                                  \
      ngx_http_appmanager_set_setting,                                        \
      NGX_HTTP_LOC_CONF_OFFSET,                                               \
      0,                                                                      \
      &ngx_http_appmanager_settings[id] },
#include <appmanager_directives.def>
#undef AM_DIRECTIVE

    ngx_http_appmanager_passenger_only("passenger_root")
    ngx_http_appmanager_passenger_only("passenger_ctl")
    ngx_http_appmanager_passenger_only("passenger_instance_registry_dir")
    ngx_http_appmanager_passenger_only("passenger_data_buffer_dir")
    ngx_http_appmanager_passenger_only("passenger_default_user")
    ngx_http_appmanager_passenger_only("passenger_default_group")
    ngx_http_appmanager_passenger_only("passenger_abort_on_startup_error")
    ngx_http_appmanager_passenger_only(
        "passenger_disable_security_update_check")
    ngx_http_appmanager_passenger_only("passenger_security_update_check_proxy")
    ngx_http_appmanager_passenger_only("passenger_disable_anonymous_telemetry")
    ngx_http_appmanager_passenger_only("passenger_anonymous_telemetry_proxy")
    ngx_http_appmanager_passenger_only("passenger_show_version_in_header")
    ngx_http_appmanager_passenger_only("passenger_turbocaching")
    ngx_http_appmanager_passenger_only("passenger_stat_throttle_rate")
    ngx_http_appmanager_passenger_only("passenger_core_file_descriptor_ulimit")
    ngx_http_appmanager_passenger_only("passenger_file_descriptor_log_file")
    ngx_http_appmanager_passenger_only("passenger_disable_log_prefix")
    ngx_http_appmanager_passenger_only("passenger_load_shell_envvars")
    ngx_http_appmanager_passenger_only("passenger_preload_bundler")
    ngx_http_appmanager_passenger_only("passenger_buffer_response")
    ngx_http_appmanager_passenger_only("passenger_buffer_size")
    ngx_http_appmanager_passenger_only("passenger_buffers")
    ngx_http_appmanager_passenger_only("passenger_busy_buffers_size")
    ngx_http_appmanager_passenger_only(
        "passenger_response_buffer_high_watermark")
    ngx_http_appmanager_passenger_only("passenger_headers_hash_max_size")
    ngx_http_appmanager_passenger_only("passenger_headers_hash_bucket_size")

    ngx_null_command
};


static ngx_http_module_t  ngx_http_appmanager_module_ctx = {
    NULL,                                     /* preconfiguration */
    ngx_http_appmanager_postconfiguration,    /* postconfiguration: handler */

    ngx_http_appmanager_create_main_conf,     /* create main configuration */
    ngx_http_appmanager_init_main_conf,       /* init main: core_socket */

    NULL,                                     /* create server configuration */
    NULL,                                     /* merge server configuration */

    ngx_http_appmanager_create_loc_conf,      /* create location configuration */
    ngx_http_appmanager_merge_loc_conf        /* merge: !~App, upstream */
};


ngx_module_t  ngx_http_appmanager_module = {
    NGX_MODULE_V1,
    &ngx_http_appmanager_module_ctx,          /* module context */
    ngx_http_appmanager_commands,             /* module directives */
    NGX_HTTP_MODULE,                          /* module type */
    NULL,                                     /* init master */
    ngx_http_appmanager_init_module,          /* init module: start the core */
    ngx_http_appmanager_init_process,         /* init process: idle cache */
    NULL,                                     /* init thread */
    NULL,                                     /* exit thread */
    NULL,                                     /* exit process */
    NULL,                                     /* exit master */
    NGX_MODULE_V1_PADDING
};


/*
 * Response headers of the app that nginx does not pass on: Status is a CGI
 * leftover some frameworks still send; X-Accel-* are instructions to nginx
 * (which it still acts on), not for the client.
 */
static ngx_str_t  ngx_http_appmanager_hide_headers[] = {
    ngx_string("Status"),
    ngx_string("X-Pad"),
    ngx_string("X-Accel-Expires"),
    ngx_string("X-Accel-Redirect"),
    ngx_string("X-Accel-Limit-Rate"),
    ngx_string("X-Accel-Buffering"),
    ngx_string("X-Accel-Charset"),
    ngx_null_string
};


static void *
ngx_http_appmanager_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_appmanager_main_conf_t  *mcf;

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_appmanager_main_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    /*
     * An upstream block of our own that no "upstream" directive names: nginx
     * asks it for the peer of each request, and it answers with the core's
     * socket and the idle connections of the worker (peer.c).
     */
    mcf->upstream = ngx_pcalloc(cf->pool,
                                sizeof(ngx_http_upstream_srv_conf_t));
    if (mcf->upstream == NULL) {
        return NULL;
    }

    mcf->upstream->peer.init = ngx_http_appmanager_peer_init;
    ngx_str_set(&mcf->upstream->host, "appmanager");

    return mcf;
}


static char *
ngx_http_appmanager_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_appmanager_main_conf_t  *mcf = conf;

    ngx_str_t  *socket;

    if (mcf->values[AM_S_CORE_SOCKET] == NULL) {
        /* the socket of the core nginx starts is known when it starts */
        return NGX_CONF_OK;
    }

    socket = mcf->values[AM_S_CORE_SOCKET]->elts;

    if (ngx_http_appmanager_set_socket(cf->pool, cf->log, mcf, socket)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_appmanager_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_appmanager_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_appmanager_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->enabled = NGX_CONF_UNSET;
    conf->request_buffering = NGX_CONF_UNSET;
    conf->document_root_index = NGX_ERROR;

    conf->upstream.hide_headers = NGX_CONF_UNSET_PTR;
    conf->upstream.pass_headers = NGX_CONF_UNSET_PTR;

    return conf;
}


static char *
ngx_http_appmanager_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_appmanager_loc_conf_t *prev = parent;
    ngx_http_appmanager_loc_conf_t *conf = child;

    ngx_hash_init_t                   hash;
    ngx_http_upstream_conf_t         *u;
    ngx_http_appmanager_main_conf_t  *mcf;

    if (ngx_http_appmanager_merge_values(cf, prev, conf) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_appmanager_module);

    /*
     * The upstream settings are fixed rather than directives: the core is
     * local, answers at once, and enforces its own time limits per app
     * (max_request_time), so the read timeout only has to outlast long-lived
     * responses such as event streams.
     */
    u = &conf->upstream;
    u->upstream = mcf->upstream;
    u->connect_timeout = 10000;
    u->send_timeout = 60000;
    u->read_timeout = 3600000;
    u->buffer_size = 16384;
    u->buffering = 0;
    u->request_buffering = conf->request_buffering;
    u->pass_request_headers = 1;
    u->pass_request_body = 1;
    u->ignore_client_abort = 0;
    u->intercept_errors = 0;

    /*
     * A connection taken from the idle cache may have been closed by the core
     * just then; such a failure is retried once on a fresh connection (peer.c),
     * as nginx allows for idempotent requests only.
     */
    u->next_upstream = NGX_HTTP_UPSTREAM_FT_ERROR;
    u->next_upstream_tries = 0;
    u->next_upstream_timeout = 0;

    ngx_str_set(&u->module, "appmanager");

    hash.max_size = 512;
    hash.bucket_size = ngx_align(64, ngx_cacheline_size);
    hash.name = "appmanager_hide_headers_hash";

    /* without this hash every response would divide by its zero size */
    if (ngx_http_upstream_hide_headers_hash(cf, &conf->upstream,
                                            &prev->upstream,
                                            ngx_http_appmanager_hide_headers,
                                            &hash)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_appmanager_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    /*
     * A content-phase handler rather than a location handler: nginx runs the
     * handlers of a phase last-registered first, so ours sees each request
     * before the static module and declines the ones for existing files,
     * which nginx then serves itself.
     */
    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_CONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_appmanager_handler;

    return NGX_OK;
}


static ngx_int_t
ngx_http_appmanager_init_module(ngx_cycle_t *cycle)
{
    return ngx_http_appmanager_init_core(cycle);
}


static ngx_int_t
ngx_http_appmanager_init_process(ngx_cycle_t *cycle)
{
    return ngx_http_appmanager_init_peer_cache(cycle);
}
