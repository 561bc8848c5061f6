/*
 * appmanager's nginx module: what its files share.
 *
 * The module hands requests to the appmanager core over a Unix socket
 * (docs/protocol/connector.md). Its files split by concern:
 *
 *   ngx_http_appmanager_module.c   wiring: command table, configuration, module
 *   ngx_http_appmanager_conf.c     directive values: checks, merging, !~App
 *   ngx_http_appmanager_handler.c  the request path on ngx_http_upstream
 *   ngx_http_appmanager_peer.c     connections to the core, kept alive
 *   ngx_http_appmanager_core.c     starting the core with nginx
 */

#ifndef _NGX_HTTP_APPMANAGER_MODULE_H_INCLUDED_
#define _NGX_HTTP_APPMANAGER_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <sys/un.h>


/*
 * The generated table (integrations/appmanager_directives.def) names kinds,
 * roles and checks with these tokens; they are the table's vocabulary, shared
 * with the Apache module, hence not prefixed like the module's own symbols.
 */
enum { AM_STR, AM_PATH, AM_INT, AM_FLOAT, AM_BOOL, AM_ENV, AM_LIST };
enum { AM_ROLE_APP, AM_ROLE_CORE, AM_ROLE_MODULE };
enum {
    AM_CHECK_NONE, AM_CHECK_MIN, AM_CHECK_URI_PATH, AM_CHECK_USER,
    AM_CHECK_GROUP, AM_CHECK_READABLE_FILE, AM_CHECK_HOST_PORT, AM_CHECK_URL,
    AM_CHECK_NONEMPTY, AM_CHECK_PORT
};

/* One id per setting row, in the table's order: the order of !~App fields. */
enum {
#define AM_SETTING(id, name, kind, role, check, minimum, choices)  id,
#include <appmanager_directives.def>
#undef AM_SETTING
    NGX_HTTP_APPMANAGER_NSETTINGS
};


/* One setting row of the table, as the directive handlers read it. */
typedef struct {
    ngx_str_t    name;       /* the key sent to the core */
    ngx_uint_t   kind;
    ngx_uint_t   role;
    ngx_uint_t   check;
    double       minimum;
    const char  *choices;    /* '|'-separated, or NULL */
} ngx_http_appmanager_setting_t;


/*
 * Values as written in the configuration, by setting id: an array of ngx_str_t
 * (several for env_var, "NAME=VALUE" each, and for list settings), NULL where
 * the block does not set it.
 */
typedef ngx_array_t  *ngx_http_appmanager_values_t[NGX_HTTP_APPMANAGER_NSETTINGS];


typedef struct {
    /* http-level settings: core_socket, core_command, core-role ones */
    ngx_http_appmanager_values_t   values;

    /* where requests go: the core's socket, filled when nginx starts */
    ngx_str_t                      socket_path;
    ngx_str_t                      peer_name;     /* "unix:<path>", for logs */
    struct sockaddr_un             sockaddr;
    socklen_t                      socklen;

    /*
     * "!~Secret: <the core's secret>\r\n", read by the master from the file
     * next to the socket (workers cannot read it); empty when unreadable, and
     * then the core refuses the requests.
     */
    ngx_str_t                      secret_line;

    /* our own upstream "block": it only points nginx at our peer functions */
    ngx_http_upstream_srv_conf_t  *upstream;

    /* some location enables appmanager: only then is a core started */
    ngx_flag_t                     used;
} ngx_http_appmanager_main_conf_t;


typedef struct {
    ngx_http_appmanager_values_t   values;

    ngx_flag_t                     enabled;
    ngx_flag_t                     request_buffering;

    /*
     * The "!~App: ...\r\n" header line, computed once when the configuration
     * is merged. When the app root comes from a root with variables it can only
     * be known per request: then app_line is empty and app_rest holds the
     * fields after app_root.
     */
    ngx_str_t                      app_line;
    ngx_str_t                      app_rest;
    ngx_int_t                      document_root_index;

    ngx_http_upstream_conf_t       upstream;
} ngx_http_appmanager_loc_conf_t;


extern ngx_module_t                    ngx_http_appmanager_module;
extern ngx_http_appmanager_setting_t   ngx_http_appmanager_settings[];


/* conf.c */
char *ngx_http_appmanager_set_setting(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_appmanager_ignore(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_appmanager_merge_values(ngx_conf_t *cf,
    ngx_http_appmanager_loc_conf_t *prev, ngx_http_appmanager_loc_conf_t *conf);
u_char *ngx_http_appmanager_escape(u_char *dst, u_char *src, size_t len);
size_t ngx_http_appmanager_escaped_len(u_char *src, size_t len);
ngx_int_t ngx_http_appmanager_set_socket(ngx_pool_t *pool, ngx_log_t *log,
    ngx_http_appmanager_main_conf_t *mcf, ngx_str_t *path);
void ngx_http_appmanager_parent_dir(ngx_str_t *path);
ngx_int_t ngx_http_appmanager_make_app_line(ngx_pool_t *pool, ngx_str_t *root,
    ngx_str_t *rest, ngx_str_t *line);

/* handler.c */
ngx_int_t ngx_http_appmanager_handler(ngx_http_request_t *r);

/* peer.c */
ngx_int_t ngx_http_appmanager_peer_init(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us);
ngx_int_t ngx_http_appmanager_init_peer_cache(ngx_cycle_t *cycle);

/* core.c */
ngx_int_t ngx_http_appmanager_init_core(ngx_cycle_t *cycle);
void ngx_http_appmanager_read_secret(ngx_cycle_t *cycle,
    ngx_http_appmanager_main_conf_t *mcf);


#endif /* _NGX_HTTP_APPMANAGER_MODULE_H_INCLUDED_ */
