/*
 * appmanager's nginx module: the request path. A request in an enabled
 * location that names no existing file goes to the core on nginx's upstream
 * machinery: create_request writes the request as the connector protocol asks
 * (docs/protocol/connector.md), process_header reads the response head, and
 * the input filters pass the body on as it arrives (non-buffered), de-chunking
 * a chunked one and noting whether the connection can serve another request.
 */

#include "ngx_http_appmanager_module.h"


typedef enum {
    ngx_http_appmanager_st_status = 0,
    ngx_http_appmanager_st_headers
} ngx_http_appmanager_state_e;


/* Per request: where the response head's parse stands, and its framing. */
typedef struct {
    ngx_http_appmanager_state_e   state;
    ngx_http_status_t             status;
    ngx_http_chunked_t            chunked;

    unsigned                      no_body:1;
    unsigned                      is_chunked:1;
    unsigned                      overrun:1;
} ngx_http_appmanager_ctx_t;


static ngx_int_t ngx_http_appmanager_serves_file(ngx_http_request_t *r);
static ngx_int_t ngx_http_appmanager_create_request(ngx_http_request_t *r);
static ngx_int_t ngx_http_appmanager_reinit_request(ngx_http_request_t *r);
static ngx_int_t ngx_http_appmanager_process_header(ngx_http_request_t *r);
static ngx_int_t ngx_http_appmanager_add_header(ngx_http_request_t *r,
    ngx_http_upstream_t *u);
static ngx_int_t ngx_http_appmanager_end_of_head(ngx_http_request_t *r,
    ngx_http_appmanager_ctx_t *ctx);
static void ngx_http_appmanager_abort_request(ngx_http_request_t *r);
static void ngx_http_appmanager_finalize_request(ngx_http_request_t *r,
    ngx_int_t rc);
static ngx_int_t ngx_http_appmanager_input_filter_init(void *data);
static ngx_int_t ngx_http_appmanager_input_filter(void *data, ssize_t bytes);
static ngx_int_t ngx_http_appmanager_chunked_filter(ngx_http_request_t *r,
    ngx_http_appmanager_ctx_t *ctx, ssize_t bytes);
static ngx_int_t ngx_http_appmanager_pass_on(ngx_http_request_t *r,
    u_char *start, size_t len);
static ngx_uint_t ngx_http_appmanager_drops(ngx_table_elt_t *h);
static ngx_str_t *ngx_http_appmanager_server_name(ngx_http_request_t *r);
static ngx_int_t ngx_http_appmanager_dynamic_app_line(ngx_http_request_t *r,
    ngx_http_appmanager_loc_conf_t *alcf, ngx_str_t *line);


/*
 * Client headers the module never passes on (protocol, "A request", 2): the
 * hop-by-hop ones are about the client's connection, not the app's request,
 * and the module writes Content-Length itself for the body it sends.
 */
static ngx_str_t  ngx_http_appmanager_hop_by_hop[] = {
    ngx_string("Connection"),
    ngx_string("Keep-Alive"),
    ngx_string("TE"),
    ngx_string("Upgrade"),
    ngx_string("Transfer-Encoding"),
    ngx_string("Expect"),
    ngx_string("Content-Length"),
    ngx_null_string
};


ngx_int_t
ngx_http_appmanager_handler(ngx_http_request_t *r)
{
    ngx_int_t                         rc;
    ngx_http_upstream_t              *u;
    ngx_http_appmanager_ctx_t        *ctx;
    ngx_http_appmanager_loc_conf_t   *alcf;
    ngx_http_appmanager_main_conf_t  *mcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_appmanager_module);

    if (!alcf->enabled) {
        return NGX_DECLINED;
    }

    if (ngx_http_appmanager_serves_file(r)) {
        return NGX_DECLINED;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_appmanager_module);

    if (mcf->socklen == 0) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "appmanager: no core to pass the request to");
        return NGX_HTTP_BAD_GATEWAY;
    }

    if (ngx_http_upstream_create(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_appmanager_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_set_ctx(r, ctx, ngx_http_appmanager_module);

    u = r->upstream;

    ngx_str_set(&u->schema, "appmanager://");
    u->output.tag = (ngx_buf_tag_t) &ngx_http_appmanager_module;
    u->conf = &alcf->upstream;

    u->create_request = ngx_http_appmanager_create_request;
    u->reinit_request = ngx_http_appmanager_reinit_request;
    u->process_header = ngx_http_appmanager_process_header;
    u->abort_request = ngx_http_appmanager_abort_request;
    u->finalize_request = ngx_http_appmanager_finalize_request;

    /*
     * Never buffered: a streamed or long-lived response reaches the client as
     * the app writes it, and the core already shields apps from slow clients.
     */
    u->buffering = 0;
    u->input_filter_init = ngx_http_appmanager_input_filter_init;
    u->input_filter = ngx_http_appmanager_input_filter;
    u->input_filter_ctx = r;

    /*
     * A body of known length may go to the core as it arrives; a chunked one
     * is read whole first, because the core must be told its length up front.
     */
    if (!alcf->request_buffering && r->headers_in.content_length_n > 0) {
        r->request_body_no_buffering = 1;
    }

    rc = ngx_http_read_client_request_body(r, ngx_http_upstream_init);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


/*
 * Is the request for a file under the document root? Those nginx serves
 * itself, as Passenger does with public/: a GET or HEAD for an existing
 * regular file, or for a directory holding index.html.
 */
static ngx_int_t
ngx_http_appmanager_serves_file(ngx_http_request_t *r)
{
    u_char           *last;
    size_t            root;
    ngx_str_t         path;
    ngx_file_info_t   fi;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return 0;
    }

    last = ngx_http_map_uri_to_path(r, &path, &root,
                                    sizeof("index.html") - 1);
    if (last == NULL) {
        return 0;
    }

    if (last > path.data && last[-1] == '/') {
        ngx_memcpy(last, "index.html", sizeof("index.html"));
    }

    if (ngx_file_info(path.data, &fi) == NGX_FILE_ERROR) {
        return 0;
    }

    return ngx_is_file(&fi);
}


static ngx_int_t
ngx_http_appmanager_create_request(ngx_http_request_t *r)
{
    off_t                            body;
    size_t                           len, escape;
    u_char                          *p;
    in_port_t                        client_port, server_port;
    ngx_buf_t                       *b;
    ngx_str_t                       *server, app;
    ngx_uint_t                       i, https;
    ngx_chain_t                     *cl, *head, *in;
    ngx_list_part_t                 *part;
    ngx_table_elt_t                 *h;
    ngx_connection_t                *c;
    ngx_http_upstream_t             *u;
    ngx_http_appmanager_loc_conf_t  *alcf;
    ngx_http_appmanager_main_conf_t *amcf;

    u = r->upstream;
    c = r->connection;
    alcf = ngx_http_get_module_loc_conf(r, ngx_http_appmanager_module);
    amcf = ngx_http_get_module_main_conf(r, ngx_http_appmanager_module);

    app = alcf->app_line;

    if (app.len == 0
        && ngx_http_appmanager_dynamic_app_line(r, alcf, &app) != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* the length of the body sent: announced up front, or all read */
    body = 0;

    if (r->request_body_no_buffering) {
        body = r->headers_in.content_length_n;

    } else if (r->request_body) {
        for (in = r->request_body->bufs; in; in = in->next) {
            body += ngx_buf_size(in->buf);
        }
    }

    if (ngx_connection_local_sockaddr(c, NULL, 0) != NGX_OK) {
        return NGX_ERROR;
    }

    client_port = ngx_inet_get_port(c->sockaddr);
    server_port = ngx_inet_get_port(c->local_sockaddr);
    server = ngx_http_appmanager_server_name(r);

    https = 0;
#if (NGX_HTTP_SSL)
    https = (c->ssl != NULL);
#endif

    /*
     * The request target as the client sent it; after a rewrite or an
     * internal redirect there is only the new URI, escaped again.
     */
    escape = 0;

    if (r->valid_unparsed_uri) {
        len = r->unparsed_uri.len;

    } else {
        escape = 2 * ngx_escape_uri(NULL, r->uri.data, r->uri.len,
                                    NGX_ESCAPE_URI);
        len = r->uri.len + escape + (r->args.len ? 1 + r->args.len : 0);
    }

    len += r->method_name.len + 1 + sizeof(" HTTP/1.1" CRLF) - 1;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (ngx_http_appmanager_drops(&h[i])) {
            continue;
        }

        len += h[i].key.len + sizeof(": ") - 1 + h[i].value.len
               + sizeof(CRLF) - 1;
    }

    if (r->headers_in.host == NULL) {
        len += sizeof("Host: ") - 1 + server->len + sizeof(CRLF) - 1;
    }

    if (body > 0) {
        len += sizeof("Content-Length: ") - 1 + NGX_OFF_T_LEN
               + sizeof(CRLF) - 1;
    }

    len += sizeof("!~Client: ") - 1 + c->addr_text.len + 1 + NGX_INT_T_LEN
           + 1 + server->len + 1 + NGX_INT_T_LEN + sizeof(" https" CRLF) - 1;

    len += app.len + sizeof(CRLF) - 1 + amcf->secret_line.len;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_ERROR;
    }

    p = ngx_copy(b->last, r->method_name.data, r->method_name.len);
    *p++ = ' ';

    if (r->valid_unparsed_uri) {
        p = ngx_copy(p, r->unparsed_uri.data, r->unparsed_uri.len);

    } else {
        if (escape) {
            p = (u_char *) ngx_escape_uri(p, r->uri.data, r->uri.len,
                                          NGX_ESCAPE_URI);
        } else {
            p = ngx_copy(p, r->uri.data, r->uri.len);
        }

        if (r->args.len) {
            *p++ = '?';
            p = ngx_copy(p, r->args.data, r->args.len);
        }
    }

    p = ngx_cpymem(p, " HTTP/1.1" CRLF, sizeof(" HTTP/1.1" CRLF) - 1);

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (ngx_http_appmanager_drops(&h[i])) {
            continue;
        }

        p = ngx_copy(p, h[i].key.data, h[i].key.len);
        *p++ = ':'; *p++ = ' ';
        p = ngx_copy(p, h[i].value.data, h[i].value.len);
        *p++ = CR; *p++ = LF;
    }

    if (r->headers_in.host == NULL) {
        p = ngx_sprintf(p, "Host: %V" CRLF, server);
    }

    if (body > 0) {
        p = ngx_sprintf(p, "Content-Length: %O" CRLF, body);
    }

    p = ngx_sprintf(p, "!~Client: %V %ui %V %ui %s" CRLF,
                    &c->addr_text, (ngx_uint_t) client_port, server,
                    (ngx_uint_t) server_port, https ? "https" : "http");

    p = ngx_copy(p, app.data, app.len);
    p = ngx_copy(p, amcf->secret_line.data, amcf->secret_line.len);
    *p++ = CR; *p++ = LF;

    b->last = p;

    head = ngx_alloc_chain_link(r->pool);
    if (head == NULL) {
        return NGX_ERROR;
    }

    head->buf = b;
    cl = head;

    /*
     * A buffered body follows the head. nginx rewinds these buffers to their
     * start to send the request again on another connection, so they are
     * copies of the request body's, which stay as they are. An unbuffered
     * body is appended by nginx itself as it arrives.
     */
    if (!r->request_body_no_buffering && r->request_body) {
        for (in = r->request_body->bufs; in; in = in->next) {
            b = ngx_alloc_buf(r->pool);
            if (b == NULL) {
                return NGX_ERROR;
            }

            ngx_memcpy(b, in->buf, sizeof(ngx_buf_t));

            cl->next = ngx_alloc_chain_link(r->pool);
            if (cl->next == NULL) {
                return NGX_ERROR;
            }

            cl = cl->next;
            cl->buf = b;
        }
    }

    cl->next = NULL;
    u->request_bufs = head;

    return NGX_OK;
}


static ngx_uint_t
ngx_http_appmanager_drops(ngx_table_elt_t *h)
{
    ngx_str_t  *name;

    /* connector fields come from the module alone: a client cannot forge one */
    if (h->key.len >= 2 && h->key.data[0] == '!' && h->key.data[1] == '~') {
        return 1;
    }

    for (name = ngx_http_appmanager_hop_by_hop; name->len; name++) {
        if (h->key.len == name->len
            && ngx_strncasecmp(h->key.data, name->data, name->len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


/*
 * The virtual server's name, as nginx's $server_name gives it to FastCGI,
 * unless that is no name at all (empty, "_", a wildcard or a regex): then the
 * host the client asked for.
 */
static ngx_str_t *
ngx_http_appmanager_server_name(ngx_http_request_t *r)
{
    ngx_str_t                 *name;
    ngx_http_core_srv_conf_t  *cscf;

    static ngx_str_t  localhost = ngx_string("localhost");

    cscf = ngx_http_get_module_srv_conf(r, ngx_http_core_module);
    name = &cscf->server_name;

    if (name->len == 0
        || (name->len == 1 && name->data[0] == '_')
        || name->data[0] == '~' || name->data[0] == '.'
        || ngx_strlchr(name->data, name->data + name->len, '*') != NULL)
    {
        name = r->headers_in.server.len ? &r->headers_in.server : &localhost;
    }

    return name;
}


/* The !~App line where the app root is the parent of a root with variables. */
static ngx_int_t
ngx_http_appmanager_dynamic_app_line(ngx_http_request_t *r,
    ngx_http_appmanager_loc_conf_t *alcf, ngx_str_t *line)
{
    ngx_str_t                   root;
    ngx_http_variable_value_t  *vv;

    vv = ngx_http_get_indexed_variable(r, alcf->document_root_index);

    if (vv == NULL || vv->not_found || vv->len == 0) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "appmanager: no document root to find the app in; "
                      "set appmanager_app_root");
        return NGX_ERROR;
    }

    root.data = vv->data;
    root.len = vv->len;
    ngx_http_appmanager_parent_dir(&root);

    return ngx_http_appmanager_make_app_line(r->pool, &root, &alcf->app_rest,
                                             line);
}


static ngx_int_t
ngx_http_appmanager_reinit_request(ngx_http_request_t *r)
{
    ngx_http_appmanager_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_appmanager_module);

    if (ctx != NULL) {
        ngx_memzero(ctx, sizeof(ngx_http_appmanager_ctx_t));
    }

    r->state = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_appmanager_process_header(ngx_http_request_t *r)
{
    ngx_int_t                   rc;
    ngx_http_upstream_t        *u;
    ngx_http_appmanager_ctx_t  *ctx;

    u = r->upstream;
    ctx = ngx_http_get_module_ctx(r, ngx_http_appmanager_module);

    for ( ;; ) {

        if (ctx->state == ngx_http_appmanager_st_status) {
            rc = ngx_http_parse_status_line(r, &u->buffer, &ctx->status);

            if (rc == NGX_AGAIN) {
                return NGX_AGAIN;
            }

            if (rc == NGX_ERROR) {
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "appmanager: the core sent no valid HTTP/1.x "
                              "status line");
                return NGX_HTTP_UPSTREAM_INVALID_HEADER;
            }

            ctx->state = ngx_http_appmanager_st_headers;
        }

        for ( ;; ) {
            rc = ngx_http_parse_header_line(r, &u->buffer, 1);

            if (rc == NGX_OK) {
                if (ngx_http_appmanager_add_header(r, u) != NGX_OK) {
                    return NGX_ERROR;
                }

                continue;
            }

            if (rc == NGX_HTTP_PARSE_HEADER_DONE) {
                break;
            }

            if (rc == NGX_AGAIN) {
                return NGX_AGAIN;
            }

            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "appmanager: the core sent an invalid header line");
            return NGX_HTTP_UPSTREAM_INVALID_HEADER;
        }

        /*
         * An informational response (103 Early Hints, say) comes before the
         * real one on the same connection: skip it and read on.
         */
        if (ctx->status.code >= 100 && ctx->status.code < 200
            && ctx->status.code != NGX_HTTP_SWITCHING_PROTOCOLS)
        {
            ngx_memzero(&ctx->status, sizeof(ngx_http_status_t));
            ctx->state = ngx_http_appmanager_st_status;

            ngx_memzero(&u->headers_in, sizeof(ngx_http_upstream_headers_in_t));
            u->headers_in.content_length_n = -1;
            u->headers_in.last_modified_time = -1;

            if (ngx_list_init(&u->headers_in.headers, r->pool, 8,
                              sizeof(ngx_table_elt_t))
                != NGX_OK)
            {
                return NGX_ERROR;
            }

            continue;
        }

        return ngx_http_appmanager_end_of_head(r, ctx);
    }
}


static ngx_int_t
ngx_http_appmanager_add_header(ngx_http_request_t *r, ngx_http_upstream_t *u)
{
    ngx_table_elt_t                *h;
    ngx_http_upstream_header_t     *hh;
    ngx_http_upstream_main_conf_t  *umcf;

    h = ngx_list_push(&u->headers_in.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = r->header_hash;
    h->key.len = r->header_name_end - r->header_name_start;
    h->value.len = r->header_end - r->header_start;

    /* copied: the response buffer is reused for the body */
    h->key.data = ngx_pnalloc(r->pool,
                              h->key.len + 1 + h->value.len + 1 + h->key.len);
    if (h->key.data == NULL) {
        return NGX_ERROR;
    }

    h->value.data = h->key.data + h->key.len + 1;
    h->lowcase_key = h->key.data + h->key.len + 1 + h->value.len + 1;

    ngx_memcpy(h->key.data, r->header_name_start, h->key.len);
    h->key.data[h->key.len] = '\0';
    ngx_memcpy(h->value.data, r->header_start, h->value.len);
    h->value.data[h->value.len] = '\0';

    if (h->key.len == r->lowcase_index) {
        ngx_memcpy(h->lowcase_key, r->lowcase_header, h->key.len);

    } else {
        ngx_strlow(h->lowcase_key, h->key.data, h->key.len);
    }

    /* nginx's own handlers note Content-Length, Connection, Location... */
    umcf = ngx_http_get_module_main_conf(r, ngx_http_upstream_module);

    hh = ngx_hash_find(&umcf->headers_in_hash, h->hash, h->lowcase_key,
                       h->key.len);

    if (hh && hh->handler(r, h, hh->offset) != NGX_OK) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* The head is complete: how is the body framed, and can the connection stay? */
static ngx_int_t
ngx_http_appmanager_end_of_head(ngx_http_request_t *r,
    ngx_http_appmanager_ctx_t *ctx)
{
    size_t                len;
    ngx_http_upstream_t  *u;

    u = r->upstream;

    if (ctx->status.code == NGX_HTTP_SWITCHING_PROTOCOLS) {
        /* the module drops Upgrade: the core has no business switching */
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "appmanager: the core switched protocols, which "
                      "connectors do not carry");
        return NGX_HTTP_UPSTREAM_INVALID_HEADER;
    }

    u->headers_in.status_n = ctx->status.code;

    if (u->state && u->state->status == 0) {
        u->state->status = ctx->status.code;
    }

    /* a reason phrase of the app's own is kept; none gets nginx's */
    len = ctx->status.end - ctx->status.start;

    if (len > sizeof("200 ") - 1) {
        u->headers_in.status_line.data = ngx_pnalloc(r->pool, len);
        if (u->headers_in.status_line.data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(u->headers_in.status_line.data, ctx->status.start, len);
        u->headers_in.status_line.len = len;
    }

    if ((r->method & NGX_HTTP_HEAD)
        || ctx->status.code == NGX_HTTP_NO_CONTENT
        || ctx->status.code == NGX_HTTP_NOT_MODIFIED)
    {
        ctx->no_body = 1;

    } else if (u->headers_in.chunked) {
        ctx->is_chunked = 1;
        u->headers_in.content_length_n = -1;

    } else if (u->headers_in.content_length
               && u->headers_in.content_length_n < 0)
    {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "appmanager: the core sent an invalid Content-Length: "
                      "\"%V\"", &u->headers_in.content_length->value);
        return NGX_HTTP_UPSTREAM_INVALID_HEADER;
    }

    /*
     * Known here already when there is no body: nginx may finish a HEAD
     * response without reading further, and the connection is still good for
     * another request if nothing follows the head.
     */
    if (ctx->no_body
        || (!ctx->is_chunked && u->headers_in.content_length_n == 0))
    {
        u->keepalive = !u->headers_in.connection_close
                       && u->buffer.pos == u->buffer.last;
    }

    return NGX_OK;
}


static void
ngx_http_appmanager_abort_request(ngx_http_request_t *r)
{
    return;
}


static void
ngx_http_appmanager_finalize_request(ngx_http_request_t *r, ngx_int_t rc)
{
    return;
}


static ngx_int_t
ngx_http_appmanager_input_filter_init(void *data)
{
    ngx_http_request_t  *r = data;

    ngx_http_upstream_t        *u;
    ngx_http_appmanager_ctx_t  *ctx;

    u = r->upstream;
    ctx = ngx_http_get_module_ctx(r, ngx_http_appmanager_module);

    if (ctx->no_body) {
        u->length = 0;

    } else if (ctx->is_chunked) {
        /* not 0 (done) nor -1 (until closed): more to come */
        u->length = 1;

    } else {
        /* -1 without Content-Length: the body ends when the core closes */
        u->length = u->headers_in.content_length_n;
    }

    return NGX_OK;
}


/*
 * Called with each read from the core: the new bytes start at u->buffer.last.
 * Bytes pass on to the client as buffers pointing into u->buffer, flushed at
 * once so that nothing waits for more.
 */
static ngx_int_t
ngx_http_appmanager_input_filter(void *data, ssize_t bytes)
{
    ngx_http_request_t  *r = data;

    u_char                     *start;
    ngx_http_upstream_t        *u;
    ngx_http_appmanager_ctx_t  *ctx;

    u = r->upstream;
    ctx = ngx_http_get_module_ctx(r, ngx_http_appmanager_module);

    if (ctx->is_chunked) {
        return ngx_http_appmanager_chunked_filter(r, ctx, bytes);
    }

    start = u->buffer.last;
    u->buffer.last += bytes;

    if (u->length == -1) {
        return ngx_http_appmanager_pass_on(r, start, bytes);
    }

    if (bytes > u->length) {
        if (!ctx->overrun) {
            ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                          "appmanager: the core sent more than its "
                          "Content-Length");
        }

        /* the connection is out of step with responses: not reused */
        ctx->overrun = 1;
        u->keepalive = 0;
        bytes = u->length;
    }

    if (bytes == 0) {
        return NGX_OK;
    }

    u->length -= bytes;

    if (u->length == 0 && !ctx->overrun) {
        u->keepalive = !u->headers_in.connection_close;
    }

    return ngx_http_appmanager_pass_on(r, start, bytes);
}


static ngx_int_t
ngx_http_appmanager_chunked_filter(ngx_http_request_t *r,
    ngx_http_appmanager_ctx_t *ctx, ssize_t bytes)
{
    size_t                size;
    ngx_int_t             rc;
    ngx_buf_t            *b;
    ngx_http_upstream_t  *u;

    u = r->upstream;
    b = &u->buffer;

    b->pos = b->last;
    b->last += bytes;

    if (u->length == 0) {
        /* bytes after the last chunk */
        u->keepalive = 0;
        return NGX_OK;
    }

    for ( ;; ) {
        rc = ngx_http_parse_chunked(r, b, &ctx->chunked);

        if (rc == NGX_OK) {
            /* a part of a chunk's data: pass on what is here of it */
            size = ngx_min(ctx->chunked.size, b->last - b->pos);

            if (ngx_http_appmanager_pass_on(r, b->pos, size) != NGX_OK) {
                return NGX_ERROR;
            }

            b->pos += size;
            ctx->chunked.size -= size;
            continue;
        }

        if (rc == NGX_DONE) {
            /* the last chunk and its trailers: the response is complete */
            u->length = 0;
            u->keepalive = !u->headers_in.connection_close
                           && b->pos == b->last;
            return NGX_OK;
        }

        if (rc == NGX_AGAIN) {
            return NGX_OK;
        }

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "appmanager: the core sent an invalid chunked body");
        return NGX_ERROR;
    }
}


static ngx_int_t
ngx_http_appmanager_pass_on(ngx_http_request_t *r, u_char *start,
    size_t len)
{
    ngx_chain_t          *cl, **ll;
    ngx_http_upstream_t  *u;

    u = r->upstream;

    if (len == 0) {
        return NGX_OK;
    }

    for (cl = u->out_bufs, ll = &u->out_bufs; cl; cl = cl->next) {
        ll = &cl->next;
    }

    cl = ngx_chain_get_free_buf(r->pool, &u->free_bufs);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    *ll = cl;

    cl->buf->flush = 1;
    cl->buf->memory = 1;
    cl->buf->pos = start;
    cl->buf->last = start + len;
    cl->buf->tag = u->output.tag;

    return NGX_OK;
}
