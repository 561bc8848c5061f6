/*
 * appmanager's nginx module: directive values. Each value is checked when
 * nginx reads its configuration, with the same rules the core applies
 * (appmanager/settings.py), so that `nginx -t` names a bad directive instead of
 * the core answering 500 later. Values are kept as written; the "!~App" line a
 * location sends is built here once, when the configuration is merged.
 */

#include "ngx_http_appmanager_module.h"

#include <grp.h>
#include <pwd.h>


static char *ngx_http_appmanager_check(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_http_appmanager_setting_t *s, ngx_str_t *value);
static char *ngx_http_appmanager_check_number(ngx_conf_t *cf,
    ngx_command_t *cmd, ngx_http_appmanager_setting_t *s, ngx_str_t *value);
static char *ngx_http_appmanager_check_choice(ngx_conf_t *cf,
    ngx_command_t *cmd, ngx_http_appmanager_setting_t *s, ngx_str_t *value);
static ngx_int_t ngx_http_appmanager_is_absolute_path(ngx_uint_t id,
    ngx_http_appmanager_setting_t *s);
static ngx_int_t ngx_http_appmanager_app_line(ngx_conf_t *cf,
    ngx_http_appmanager_loc_conf_t *conf);
static ngx_int_t ngx_http_appmanager_flag(ngx_array_t *values,
    ngx_flag_t fallback);


/* Bytes sent as they are in !~App values; every other byte becomes %XX. */
static uint32_t  ngx_http_appmanager_unreserved[] = {
    0x00000000, /* control characters */
    0x03ffe000, /* 0-9 / . - */
    0x87fffffe, /* _ A-Z */
    0x47fffffe, /* ~ a-z */
    0x00000000, 0x00000000, 0x00000000, 0x00000000
};


char *
ngx_http_appmanager_set_setting(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_appmanager_loc_conf_t *alcf = conf;

    size_t                            len;
    u_char                           *p;
    ngx_uint_t                        id;
    ngx_str_t                        *value, *v, text;
    ngx_array_t                     **slot;
    ngx_http_appmanager_setting_t    *s;
    ngx_http_appmanager_main_conf_t  *mcf;

    s = cmd->post;
    id = s - ngx_http_appmanager_settings;
    value = cf->args->elts;

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_appmanager_module);

    /* http-only settings live in the main configuration, the rest per block */
    if (s->role == AM_ROLE_CORE
        || id == AM_S_CORE_SOCKET || id == AM_S_CORE_COMMAND)
    {
        slot = &mcf->values[id];

    } else {
        slot = &alcf->values[id];
    }

    if (*slot != NULL && s->kind != AM_ENV && s->kind != AM_LIST) {
        return "is duplicate";
    }

    switch (s->kind) {

    case AM_BOOL:
        if (ngx_strcasecmp(value[1].data, (u_char *) "on") == 0) {
            ngx_str_set(&text, "on");

        } else if (ngx_strcasecmp(value[1].data, (u_char *) "off") == 0) {
            ngx_str_set(&text, "off");

        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\" must be on or off, got \"%V\"",
                               &cmd->name, &value[1]);
            return NGX_CONF_ERROR;
        }

        if (id == AM_S_ENABLED && text.len == 2) {
            mcf->used = 1;
        }

        break;

    case AM_ENV:
        /* NAME VALUE in nginx, one NAME=VALUE field for the core */
        if (value[1].len == 0
            || ngx_strlchr(value[1].data, value[1].data + value[1].len, '=')
               != NULL)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\" needs a variable name without \"=\", "
                               "got \"%V\"", &cmd->name, &value[1]);
            return NGX_CONF_ERROR;
        }

        len = value[1].len + 1 + value[2].len;
        p = ngx_pnalloc(cf->pool, len);
        if (p == NULL) {
            return NGX_CONF_ERROR;
        }

        text.data = p;
        text.len = len;
        p = ngx_cpymem(p, value[1].data, value[1].len);
        *p++ = '=';
        ngx_memcpy(p, value[2].data, value[2].len);
        break;

    default:
        text = value[1];

        if (ngx_http_appmanager_check(cf, cmd, s, &text) != NGX_CONF_OK) {
            return NGX_CONF_ERROR;
        }

        /*
         * The core may run in another directory than nginx: paths it opens
         * on nginx's behalf are made absolute against nginx's prefix, as
         * nginx does with its own (paths relative to the app, such as
         * startup_file and restart_dir, stay as they are).
         */
        if (ngx_http_appmanager_is_absolute_path(id, s)
            && ngx_conf_full_name(cf->cycle, &text, 0) != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (*slot == NULL) {
        *slot = ngx_array_create(cf->pool, 1, sizeof(ngx_str_t));
        if (*slot == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    v = ngx_array_push(*slot);
    if (v == NULL) {
        return NGX_CONF_ERROR;
    }

    *v = text;

    return NGX_CONF_OK;
}


char *
ngx_http_appmanager_ignore(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_appmanager_is_absolute_path(ngx_uint_t id,
    ngx_http_appmanager_setting_t *s)
{
    if (s->kind != AM_PATH) {
        return 0;
    }

    return id == AM_S_APP_ROOT
           || id == AM_S_CORE_SOCKET
           || s->role == AM_ROLE_CORE
           || s->check == AM_CHECK_READABLE_FILE;
}


static char *
ngx_http_appmanager_check(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_http_appmanager_setting_t *s, ngx_str_t *value)
{
    u_char         *p, *colon;
    ngx_int_t       port;
    ngx_uint_t      i;
    struct group   *gr;
    struct passwd  *pw;
    ngx_file_info_t fi;

    if (s->kind == AM_INT || s->kind == AM_FLOAT) {
        return ngx_http_appmanager_check_number(cf, cmd, s, value);
    }

    if (s->choices != NULL) {
        return ngx_http_appmanager_check_choice(cf, cmd, s, value);
    }

    switch (s->check) {

    case AM_CHECK_NONEMPTY:
        for (i = 0; i < value->len; i++) {
            if (value->data[i] != ' ' && value->data[i] != '\t') {
                return NGX_CONF_OK;
            }
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\" must not be empty",
                           &cmd->name);
        return NGX_CONF_ERROR;

    case AM_CHECK_URI_PATH:
        if (value->len == 0 || value->data[0] != '/'
            || ngx_strlchr(value->data, value->data + value->len, '?')
            || ngx_strlchr(value->data, value->data + value->len, '#'))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\" must be a path starting with /, "
                               "got \"%V\"", &cmd->name, value);
            return NGX_CONF_ERROR;
        }

        return NGX_CONF_OK;

    case AM_CHECK_USER:
        pw = getpwnam((char *) value->data);
        if (pw == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\": user \"%V\" does not exist",
                               &cmd->name, value);
            return NGX_CONF_ERROR;
        }

        if (pw->pw_uid == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\": apps never run as root",
                               &cmd->name);
            return NGX_CONF_ERROR;
        }

        return NGX_CONF_OK;

    case AM_CHECK_GROUP:
        gr = getgrnam((char *) value->data);
        if (gr == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\": group \"%V\" does not exist",
                               &cmd->name, value);
            return NGX_CONF_ERROR;
        }

        if (gr->gr_gid == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\": apps never run as group root",
                               &cmd->name);
            return NGX_CONF_ERROR;
        }

        return NGX_CONF_OK;

    case AM_CHECK_READABLE_FILE:
        /* relative to nginx's prefix, where the value will point */
        if (ngx_conf_full_name(cf->cycle, value, 0) != NGX_OK) {
            return NGX_CONF_ERROR;
        }

        if (ngx_file_info(value->data, &fi) == NGX_FILE_ERROR
            || !ngx_is_file(&fi))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\": file \"%V\" does not exist",
                               &cmd->name, value);
            return NGX_CONF_ERROR;
        }

        if (access((char *) value->data, R_OK) != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                               "\"%V\": file \"%V\" is not readable",
                               &cmd->name, value);
            return NGX_CONF_ERROR;
        }

        return NGX_CONF_OK;

    case AM_CHECK_HOST_PORT:
    case AM_CHECK_PORT:
        colon = NULL;

        for (p = value->data; p < value->data + value->len; p++) {
            if (*p == ':') {
                colon = p;
            }
        }

        p = (s->check == AM_CHECK_PORT) ? value->data
                                        : (colon ? colon + 1 : NULL);

        port = (p == NULL) ? NGX_ERROR
                           : ngx_atoi(p, value->data + value->len - p);

        if (port < 1 || port > 65535
            || (s->check == AM_CHECK_HOST_PORT && colon == value->data))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               s->check == AM_CHECK_PORT
                               ? "\"%V\" must be a port between 1 and 65535, "
                                 "got \"%V\""
                               : "\"%V\" must be HOST:PORT, got \"%V\"",
                               &cmd->name, value);
            return NGX_CONF_ERROR;
        }

        return NGX_CONF_OK;

    case AM_CHECK_URL:
        if ((value->len > 7
             && ngx_strncasecmp(value->data, (u_char *) "http://", 7) == 0)
            || (value->len > 8
                && ngx_strncasecmp(value->data, (u_char *) "https://", 8)
                   == 0))
        {
            return NGX_CONF_OK;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must be an http:// or https:// URL, "
                           "got \"%V\"", &cmd->name, value);
        return NGX_CONF_ERROR;

    default:
        return NGX_CONF_OK;
    }
}


static char *
ngx_http_appmanager_check_number(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_http_appmanager_setting_t *s, ngx_str_t *value)
{
    char    *end;
    u_char  *p;
    double   number;

    /* strtod and strtol need the terminating NUL nginx keeps after values */
    errno = 0;

    if (s->kind == AM_INT) {
        p = value->data + (value->len && value->data[0] == '-');

        if (p == value->data + value->len || *p < '0' || *p > '9') {
            goto invalid;
        }

        number = (double) strtol((char *) value->data, &end, 10);

    } else {
        number = strtod((char *) value->data, &end);
    }

    if (value->len == 0 || errno != 0
        || end != (char *) value->data + value->len || number != number)
    {
        goto invalid;
    }

    if (s->check == AM_CHECK_MIN && number < s->minimum) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must be at least %d, got \"%V\"",
                           &cmd->name, (int) s->minimum, value);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\" must be %s, got \"%V\"",
                       &cmd->name,
                       s->kind == AM_INT ? "an integer" : "a number", value);
    return NGX_CONF_ERROR;
}


static char *
ngx_http_appmanager_check_choice(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_http_appmanager_setting_t *s, ngx_str_t *value)
{
    size_t       len;
    const char  *p, *bar;

    for (p = s->choices; ; p = bar + 1) {
        bar = strchr(p, '|');
        len = bar ? (size_t) (bar - p) : strlen(p);

        if (len == value->len && ngx_strncmp(p, value->data, len) == 0) {
            return NGX_CONF_OK;
        }

        if (bar == NULL) {
            break;
        }
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V\" must be one of %s, got \"%V\"",
                       &cmd->name, s->choices, value);
    return NGX_CONF_ERROR;
}


char *
ngx_http_appmanager_merge_values(ngx_conf_t *cf,
    ngx_http_appmanager_loc_conf_t *prev, ngx_http_appmanager_loc_conf_t *conf)
{
    ngx_uint_t    id, i;
    ngx_str_t    *v;
    ngx_array_t  *merged;

    for (id = 0; id < NGX_HTTP_APPMANAGER_NSETTINGS; id++) {

        if (prev->values[id] == NULL) {
            continue;
        }

        if (conf->values[id] == NULL) {
            conf->values[id] = prev->values[id];
            continue;
        }

        if (ngx_http_appmanager_settings[id].kind != AM_ENV) {
            continue;
        }

        /*
         * Environment variables add up from http to location: an inner
         * block adds its own and overrides an outer one of the same name
         * (the core keeps the last NAME=VALUE it reads).
         */
        merged = ngx_array_create(cf->pool,
                                  prev->values[id]->nelts
                                  + conf->values[id]->nelts,
                                  sizeof(ngx_str_t));
        if (merged == NULL) {
            return NGX_CONF_ERROR;
        }

        for (i = 0; i < prev->values[id]->nelts; i++) {
            v = ngx_array_push(merged);
            *v = ((ngx_str_t *) prev->values[id]->elts)[i];
        }

        for (i = 0; i < conf->values[id]->nelts; i++) {
            v = ngx_array_push(merged);
            *v = ((ngx_str_t *) conf->values[id]->elts)[i];
        }

        conf->values[id] = merged;
    }

    conf->enabled = ngx_http_appmanager_flag(conf->values[AM_S_ENABLED], 0);
    conf->request_buffering =
        ngx_http_appmanager_flag(conf->values[AM_S_REQUEST_BUFFERING], 1);

    if (ngx_http_appmanager_app_line(cf, conf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_appmanager_flag(ngx_array_t *values, ngx_flag_t fallback)
{
    ngx_str_t  *v;

    if (values == NULL) {
        return fallback;
    }

    v = values->elts;

    return v[0].len == 2;   /* "on"; "off" otherwise */
}


/*
 * Builds "!~App: app_root=...&key=value...\r\n" for this block: app_root
 * first, then every app setting the configuration gives, in the table's order.
 * Without appmanager_app_root, the app root is the parent of the document
 * root, as in Passenger; a root with variables is only known per request.
 */
static ngx_int_t
ngx_http_appmanager_app_line(ngx_conf_t *cf,
    ngx_http_appmanager_loc_conf_t *conf)
{
    size_t                     len;
    u_char                    *p;
    ngx_str_t                 *v, root, name;
    ngx_uint_t                 id, i;
    ngx_http_core_loc_conf_t  *clcf;

    len = 0;

    for (id = 0; id < NGX_HTTP_APPMANAGER_NSETTINGS; id++) {
        if (id == AM_S_APP_ROOT || conf->values[id] == NULL
            || ngx_http_appmanager_settings[id].role != AM_ROLE_APP)
        {
            continue;
        }

        v = conf->values[id]->elts;

        for (i = 0; i < conf->values[id]->nelts; i++) {
            len += 1 + ngx_http_appmanager_settings[id].name.len + 1
                   + ngx_http_appmanager_escaped_len(v[i].data, v[i].len);
        }
    }

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL && len) {
        return NGX_ERROR;
    }

    conf->app_rest.data = p;
    conf->app_rest.len = len;

    for (id = 0; id < NGX_HTTP_APPMANAGER_NSETTINGS; id++) {
        if (id == AM_S_APP_ROOT || conf->values[id] == NULL
            || ngx_http_appmanager_settings[id].role != AM_ROLE_APP)
        {
            continue;
        }

        v = conf->values[id]->elts;
        name = ngx_http_appmanager_settings[id].name;

        for (i = 0; i < conf->values[id]->nelts; i++) {
            *p++ = '&';
            p = ngx_cpymem(p, name.data, name.len);
            *p++ = '=';
            p = ngx_http_appmanager_escape(p, v[i].data, v[i].len);
        }
    }

    if (conf->values[AM_S_APP_ROOT] != NULL) {
        root = *(ngx_str_t *) conf->values[AM_S_APP_ROOT]->elts;

    } else {
        clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

        if (clcf->root_lengths != NULL) {
            ngx_str_set(&name, "document_root");
            conf->document_root_index = ngx_http_get_variable_index(cf,
                                                                    &name);
            if (conf->document_root_index == NGX_ERROR) {
                return NGX_ERROR;
            }

            ngx_str_null(&conf->app_line);
            return NGX_OK;
        }

        root = clcf->root;
        ngx_http_appmanager_parent_dir(&root);
    }

    return ngx_http_appmanager_make_app_line(cf->pool, &root, &conf->app_rest,
                                             &conf->app_line);
}


/* The app root of a block without appmanager_app_root. */
void
ngx_http_appmanager_parent_dir(ngx_str_t *path)
{
    while (path->len > 1 && path->data[path->len - 1] == '/') {
        path->len--;
    }

    while (path->len > 1 && path->data[path->len - 1] != '/') {
        path->len--;
    }

    if (path->len > 1) {
        path->len--;
    }
}


/* "!~App: app_root=<root><rest>\r\n", allocated in the pool. */
ngx_int_t
ngx_http_appmanager_make_app_line(ngx_pool_t *pool, ngx_str_t *root,
    ngx_str_t *rest, ngx_str_t *line)
{
    u_char  *p;

    line->len = sizeof("!~App: app_root=") - 1
                + ngx_http_appmanager_escaped_len(root->data, root->len)
                + rest->len + sizeof(CRLF) - 1;

    line->data = ngx_pnalloc(pool, line->len);
    if (line->data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(line->data, "!~App: app_root=",
                   sizeof("!~App: app_root=") - 1);
    p = ngx_http_appmanager_escape(p, root->data, root->len);
    p = ngx_cpymem(p, rest->data, rest->len);
    *p++ = CR; *p = LF;

    return NGX_OK;
}


size_t
ngx_http_appmanager_escaped_len(u_char *src, size_t len)
{
    size_t  n;

    for (n = 0; len--; src++) {
        n += (ngx_http_appmanager_unreserved[*src >> 5] & (1U << (*src & 0x1f)))
             ? 1 : 3;
    }

    return n;
}


u_char *
ngx_http_appmanager_escape(u_char *dst, u_char *src, size_t len)
{
    static u_char  hex[] = "0123456789ABCDEF";

    for ( /* void */ ; len--; src++) {
        if (ngx_http_appmanager_unreserved[*src >> 5] & (1U << (*src & 0x1f))) {
            *dst++ = *src;

        } else {
            *dst++ = '%';
            *dst++ = hex[*src >> 4];
            *dst++ = hex[*src & 0xf];
        }
    }

    return dst;
}


ngx_int_t
ngx_http_appmanager_set_socket(ngx_pool_t *pool, ngx_log_t *log,
    ngx_http_appmanager_main_conf_t *mcf, ngx_str_t *path)
{
    u_char  *p;

    if (path->len >= sizeof(mcf->sockaddr.sun_path)) {
        ngx_log_error(NGX_LOG_EMERG, log, 0,
                      "appmanager: the core's socket path \"%V\" is longer "
                      "than the %uz bytes a Unix socket path may have",
                      path, sizeof(mcf->sockaddr.sun_path) - 1);
        return NGX_ERROR;
    }

    ngx_memzero(&mcf->sockaddr, sizeof(struct sockaddr_un));
    mcf->sockaddr.sun_family = AF_UNIX;
    ngx_memcpy(mcf->sockaddr.sun_path, path->data, path->len);
    mcf->socklen = offsetof(struct sockaddr_un, sun_path) + path->len + 1;

    mcf->socket_path.data = (u_char *) mcf->sockaddr.sun_path;
    mcf->socket_path.len = path->len;

    /* nginx names the peer in its error lines, e.g. a refused connection */
    p = ngx_pnalloc(pool, sizeof("unix:") - 1 + path->len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    mcf->peer_name.data = p;
    mcf->peer_name.len = sizeof("unix:") - 1 + path->len;
    p = ngx_cpymem(p, "unix:", sizeof("unix:") - 1);
    ngx_memcpy(p, path->data, path->len);

    return NGX_OK;
}
