/*
 * appmanager's nginx module: connections to the core. There is one peer, the
 * core's Unix socket. Each worker keeps a few idle connections to it and
 * reuses them, since the core speaks HTTP/1.1 keep-alive on that socket: a
 * connection goes back to the cache only after a response that ended cleanly
 * on its framing without "Connection: close" (u->keepalive, handler.c).
 */

#include "ngx_http_appmanager_module.h"


/* Enough for a worker's concurrent requests to a local core; more close. */
#define NGX_HTTP_APPMANAGER_IDLE_MAX      16

/* Below the core's own 75 s, so that the core never closes one under us. */
#define NGX_HTTP_APPMANAGER_IDLE_TIMEOUT  60000


typedef struct {
    ngx_queue_t        queue;
    ngx_connection_t  *connection;
} ngx_http_appmanager_idle_t;


typedef struct {
    ngx_http_appmanager_main_conf_t  *mcf;
    ngx_http_upstream_t              *upstream;
    ngx_uint_t                        attempts;
} ngx_http_appmanager_peer_data_t;


static ngx_int_t ngx_http_appmanager_get_peer(ngx_peer_connection_t *pc,
    void *data);
static void ngx_http_appmanager_free_peer(ngx_peer_connection_t *pc,
    void *data, ngx_uint_t state);
static void ngx_http_appmanager_close_idle_handler(ngx_event_t *ev);
static void ngx_http_appmanager_idle_write_handler(ngx_event_t *ev);
static void ngx_http_appmanager_close(ngx_connection_t *c);


/* The worker's cache: idle connections, most recently used first. */
static ngx_queue_t                 ngx_http_appmanager_idle;
static ngx_queue_t                 ngx_http_appmanager_spare;
static ngx_http_appmanager_idle_t  ngx_http_appmanager_items[
                                       NGX_HTTP_APPMANAGER_IDLE_MAX];


ngx_int_t
ngx_http_appmanager_init_peer_cache(ngx_cycle_t *cycle)
{
    ngx_uint_t  i;

    ngx_queue_init(&ngx_http_appmanager_idle);
    ngx_queue_init(&ngx_http_appmanager_spare);

    for (i = 0; i < NGX_HTTP_APPMANAGER_IDLE_MAX; i++) {
        ngx_queue_insert_tail(&ngx_http_appmanager_spare,
                              &ngx_http_appmanager_items[i].queue);
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_appmanager_peer_init(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_appmanager_peer_data_t  *pd;

    if (ngx_http_appmanager_idle.next == NULL) {
        /* a process that did not run init_process (single-process mode) */
        ngx_http_appmanager_init_peer_cache((ngx_cycle_t *) ngx_cycle);
    }

    pd = ngx_palloc(r->pool, sizeof(ngx_http_appmanager_peer_data_t));
    if (pd == NULL) {
        return NGX_ERROR;
    }

    pd->mcf = ngx_http_get_module_main_conf(r, ngx_http_appmanager_module);
    pd->upstream = r->upstream;
    pd->attempts = 0;

    r->upstream->peer.get = ngx_http_appmanager_get_peer;
    r->upstream->peer.free = ngx_http_appmanager_free_peer;
    r->upstream->peer.data = pd;

    /* a second try only ever follows a failed idle connection (get_peer) */
    r->upstream->peer.tries = 2;

    return NGX_OK;
}


static ngx_int_t
ngx_http_appmanager_get_peer(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_appmanager_peer_data_t  *pd = data;

    ngx_queue_t                 *q;
    ngx_connection_t            *c;
    ngx_http_appmanager_idle_t  *item;

    pc->sockaddr = (struct sockaddr *) &pd->mcf->sockaddr;
    pc->socklen = pd->mcf->socklen;
    pc->name = &pd->mcf->peer_name;
    pc->cached = 0;
    pc->connection = NULL;

    if (pd->attempts++ == 0 && !ngx_queue_empty(&ngx_http_appmanager_idle)) {
        q = ngx_queue_head(&ngx_http_appmanager_idle);
        ngx_queue_remove(q);
        ngx_queue_insert_head(&ngx_http_appmanager_spare, q);

        item = ngx_queue_data(q, ngx_http_appmanager_idle_t, queue);
        c = item->connection;

        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        c->idle = 0;
        c->sent = 0;
        c->data = NULL;
        c->log = pc->log;
        c->read->log = pc->log;
        c->write->log = pc->log;
        c->pool->log = pc->log;

        pc->connection = c;
        pc->cached = 1;

        return NGX_DONE;
    }

    /*
     * A fresh connection that fails is not tried again: the core is not
     * there, and the client gets 502 with the socket named in the log.
     */
    pc->tries = 1;

    return NGX_OK;
}


static void
ngx_http_appmanager_free_peer(ngx_peer_connection_t *pc, void *data,
    ngx_uint_t state)
{
    ngx_http_appmanager_peer_data_t  *pd = data;

    ngx_queue_t                 *q;
    ngx_connection_t            *c;
    ngx_http_upstream_t         *u;
    ngx_http_appmanager_idle_t  *item;

    if (pc->tries) {
        pc->tries--;
    }

    u = pd->upstream;
    c = pc->connection;

    if ((state & NGX_PEER_FAILED)
        || c == NULL
        || c->read->eof || c->read->error || c->read->timedout
        || c->write->error || c->write->timedout)
    {
        return;
    }

    /* only after a cleanly framed response to a request sent whole */
    if (!u->keepalive || !u->request_body_sent) {
        return;
    }

    if (ngx_terminate || ngx_exiting) {
        return;
    }

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        return;
    }

    if (ngx_queue_empty(&ngx_http_appmanager_spare)) {
        /* full: the least recently used one makes room */
        q = ngx_queue_last(&ngx_http_appmanager_idle);
        ngx_queue_remove(q);
        item = ngx_queue_data(q, ngx_http_appmanager_idle_t, queue);
        ngx_http_appmanager_close(item->connection);

    } else {
        q = ngx_queue_head(&ngx_http_appmanager_spare);
        ngx_queue_remove(q);
        item = ngx_queue_data(q, ngx_http_appmanager_idle_t, queue);
    }

    ngx_queue_insert_head(&ngx_http_appmanager_idle, q);
    item->connection = c;

    /* nginx closes pc->connection after this unless it is taken from it */
    pc->connection = NULL;

    c->read->delayed = 0;
    ngx_add_timer(c->read, NGX_HTTP_APPMANAGER_IDLE_TIMEOUT);

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    c->write->handler = ngx_http_appmanager_idle_write_handler;
    c->read->handler = ngx_http_appmanager_close_idle_handler;

    /* idle: nginx closes it through the read handler when a worker exits */
    c->data = item;
    c->idle = 1;
    c->log = ngx_cycle->log;
    c->read->log = ngx_cycle->log;
    c->write->log = ngx_cycle->log;
    c->pool->log = ngx_cycle->log;

    if (c->read->ready) {
        ngx_http_appmanager_close_idle_handler(c->read);
    }
}


/*
 * An idle connection became readable, timed out, or the worker is exiting:
 * the core closed it (or sent what it should not have), so it goes. A
 * spurious wake-up with nothing to read leaves it in the cache.
 */
static void
ngx_http_appmanager_close_idle_handler(ngx_event_t *ev)
{
    int                          n;
    char                         buf[1];
    ngx_connection_t            *c;
    ngx_http_appmanager_idle_t  *item;

    c = ev->data;

    if (!c->close && !ev->timedout) {
        n = recv(c->fd, buf, 1, MSG_PEEK);

        if (n == -1 && ngx_socket_errno == NGX_EAGAIN) {
            ev->ready = 0;

            if (ngx_handle_read_event(c->read, 0) == NGX_OK) {
                return;
            }
        }
    }

    item = c->data;
    ngx_queue_remove(&item->queue);
    ngx_queue_insert_head(&ngx_http_appmanager_spare, &item->queue);

    ngx_http_appmanager_close(c);
}


static void
ngx_http_appmanager_idle_write_handler(ngx_event_t *ev)
{
    return;
}


static void
ngx_http_appmanager_close(ngx_connection_t *c)
{
    ngx_pool_t  *pool;

    pool = c->pool;

    ngx_close_connection(c);

    if (pool != NULL) {
        ngx_destroy_pool(pool);
    }
}
