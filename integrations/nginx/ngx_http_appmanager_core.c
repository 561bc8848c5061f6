/*
 * appmanager's nginx module: starting the core with nginx (protocol,
 * "Starting the core"). The master starts it once, before the workers, and
 * keeps it across reloads; the core stops when the last nginx process has
 * exited, which it learns from the lifeline: a pipe whose write end every nginx
 * process holds open.
 */

#include "ngx_http_appmanager_module.h"

#include <pwd.h>
#include <sys/syscall.h>


/* The appmanager executable that built the module, set by the build. */
#ifndef NGX_HTTP_APPMANAGER_CORE_COMMAND
#define NGX_HTTP_APPMANAGER_CORE_COMMAND  "appmanager"
#endif

/*
 * The master remembers the core it started in its own environment, the one
 * thing a reload keeps (the module itself is loaded again): "<core pid>
 * <lifeline write fd> <pipe dev> <pipe inode> <socket path>". Workers do not
 * see it: nginx gives them an environment of their own.
 */
#define NGX_HTTP_APPMANAGER_ENV          "APPMANAGER_NGINX_CORE"

#define NGX_HTTP_APPMANAGER_LIFELINE_FD  3
#define NGX_HTTP_APPMANAGER_REPORT_FD    4
#define NGX_HTTP_APPMANAGER_START_WAIT   30000


typedef struct {
    ngx_pid_t   pid;
    ngx_fd_t    lifeline;
    ngx_str_t   path;
} ngx_http_appmanager_core_t;


static ngx_int_t ngx_http_appmanager_started_core(
    ngx_http_appmanager_core_t *core);
static void ngx_http_appmanager_release_core(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_appmanager_start_core(ngx_cycle_t *cycle,
    ngx_http_appmanager_main_conf_t *mcf);
static char **ngx_http_appmanager_core_argv(ngx_cycle_t *cycle,
    ngx_http_appmanager_main_conf_t *mcf, ngx_str_t *dir, ngx_str_t *path);
static ngx_int_t ngx_http_appmanager_wait_for_core(ngx_cycle_t *cycle,
    ngx_pid_t pid, ngx_str_t *path);
static void ngx_http_appmanager_exec_core(char **argv, int lifeline,
    int report);
static char *ngx_http_appmanager_cstring(ngx_pool_t *pool, u_char *data,
    size_t len);


ngx_int_t
ngx_http_appmanager_init_core(ngx_cycle_t *cycle)
{
    ngx_http_appmanager_core_t        core;
    ngx_http_appmanager_main_conf_t  *mcf;

    /* a configuration test or "nginx -s" starts nothing */
    if (ngx_test_config || ngx_process == NGX_PROCESS_SIGNALLER) {
        return NGX_OK;
    }

    mcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_appmanager_module);

    if (mcf == NULL || !mcf->used || mcf->values[AM_S_CORE_SOCKET] != NULL) {
        /* a reload may leave a core started before with nothing to do */
        ngx_http_appmanager_release_core(cycle);

        if (mcf != NULL && mcf->used) {
            ngx_http_appmanager_read_secret(cycle, mcf);
        }

        return NGX_OK;
    }

    if (ngx_http_appmanager_started_core(&core) == NGX_OK) {
        ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                      "appmanager: using the core started before "
                      "(pid %P) on %V", core.pid, &core.path);

        if (ngx_http_appmanager_set_socket(cycle->pool, cycle->log, mcf,
                                           &core.path)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        ngx_http_appmanager_read_secret(cycle, mcf);
        return NGX_OK;
    }

    if (ngx_http_appmanager_start_core(cycle, mcf) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_http_appmanager_read_secret(cycle, mcf);
    return NGX_OK;
}


/*
 * The core writes a secret next to its socket, readable by its own user only
 * (docs/protocol/connector.md); requests that name an app must carry it, so
 * that a process running as the workers' user cannot pose as nginx. The master
 * reads it here, before the workers are forked with it.
 */
void
ngx_http_appmanager_read_secret(ngx_cycle_t *cycle,
    ngx_http_appmanager_main_conf_t *mcf)
{
    u_char     *p, buf[128];
    ssize_t     n;
    ngx_fd_t    fd;
    ngx_str_t   name;

    ngx_str_null(&mcf->secret_line);

    name.len = mcf->socket_path.len + sizeof(".secret") - 1;
    name.data = ngx_pnalloc(cycle->pool, name.len + 1);
    if (name.data == NULL) {
        return;
    }

    p = ngx_cpymem(name.data, mcf->socket_path.data, mcf->socket_path.len);
    ngx_memcpy(p, ".secret", sizeof(".secret"));

    fd = ngx_open_file(name.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_log_error(NGX_LOG_WARN, cycle->log, ngx_errno,
                      "appmanager: cannot read the core's secret \"%V\"; "
                      "the core will refuse requests (403)", &name);
        return;
    }

    n = read(fd, buf, sizeof(buf));
    (void) ngx_close_file(fd);

    while (n > 0 && (buf[n - 1] == LF || buf[n - 1] == CR || buf[n - 1] == ' '))
    {
        n--;
    }

    if (n <= 0 || n >= (ssize_t) sizeof(buf)) {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "appmanager: the core's secret \"%V\" is malformed",
                      &name);
        return;
    }

    mcf->secret_line.len = sizeof("!~Secret: ") - 1 + n + sizeof(CRLF) - 1;
    mcf->secret_line.data = ngx_pnalloc(cycle->pool, mcf->secret_line.len);
    if (mcf->secret_line.data == NULL) {
        mcf->secret_line.len = 0;
        return;
    }

    p = ngx_cpymem(mcf->secret_line.data, "!~Secret: ",
                   sizeof("!~Secret: ") - 1);
    p = ngx_cpymem(p, buf, n);
    *p++ = CR; *p = LF;
}


/* The core this master started, if it still runs; NGX_DECLINED otherwise. */
static ngx_int_t
ngx_http_appmanager_started_core(ngx_http_appmanager_core_t *core)
{
    int             status;
    char           *env, *p, *end;
    long            fields[4];
    ngx_uint_t      i;
    struct stat     st;

    env = getenv(NGX_HTTP_APPMANAGER_ENV);
    if (env == NULL) {
        return NGX_DECLINED;
    }

    p = env;

    for (i = 0; i < 4; i++) {
        fields[i] = strtol(p, &end, 10);

        if (end == p || *end != ' ') {
            goto gone;
        }

        p = end + 1;
    }

    core->pid = (ngx_pid_t) fields[0];
    core->lifeline = (ngx_fd_t) fields[1];
    core->path.data = (u_char *) p;
    core->path.len = ngx_strlen(p);

    /*
     * The descriptor must still be our pipe: after nginx replaced its binary
     * (USR2) the number may name something else, or nothing.
     */
    if (fstat(core->lifeline, &st) == -1
        || !S_ISFIFO(st.st_mode)
        || (long) st.st_dev != fields[2]
        || (long) st.st_ino != fields[3])
    {
        goto gone;
    }

    if (waitpid(core->pid, &status, WNOHANG) == core->pid
        || kill(core->pid, 0) == -1)
    {
        /* it died: a new one is started, with a new lifeline */
        close(core->lifeline);
        goto gone;
    }

    return NGX_OK;

gone:

    unsetenv(NGX_HTTP_APPMANAGER_ENV);

    return NGX_DECLINED;
}


static void
ngx_http_appmanager_release_core(ngx_cycle_t *cycle)
{
    ngx_http_appmanager_core_t  core;

    if (ngx_http_appmanager_started_core(&core) != NGX_OK) {
        return;
    }

    /* the old workers hold the lifeline until they have finished */
    close(core.lifeline);
    unsetenv(NGX_HTTP_APPMANAGER_ENV);

    ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                  "appmanager: the core started before (pid %P) is no longer "
                  "used; it stops when the old workers have exited", core.pid);
}


static ngx_int_t
ngx_http_appmanager_start_core(ngx_cycle_t *cycle,
    ngx_http_appmanager_main_conf_t *mcf)
{
    int           lifeline[2], report[2], err;
    char        **argv, *value;
    size_t        len;
    ssize_t       n;
    u_char       *p;
    ngx_pid_t     pid;
    ngx_str_t     dir, path;
    const char   *tmp;
    struct stat   st;

    if (mcf->values[AM_S_INSTANCE_DIR] != NULL) {
        dir = *(ngx_str_t *) mcf->values[AM_S_INSTANCE_DIR]->elts;

    } else {
        tmp = getenv("TMPDIR");
        if (tmp == NULL || *tmp != '/') {
            tmp = "/tmp";
        }

        /*
         * Made here, with a name nobody can guess and take first: the
         * socket's path must be known before the core starts.
         */
        len = ngx_strlen(tmp) + sizeof("/appmanager-nginx.XXXXXX");
        dir.data = ngx_pnalloc(cycle->pool, len);
        if (dir.data == NULL) {
            return NGX_ERROR;
        }

        ngx_sprintf(dir.data, "%s/appmanager-nginx.XXXXXX%Z", tmp);

        if (mkdtemp((char *) dir.data) == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "appmanager: cannot create an instance directory "
                          "\"%s\"", dir.data);
            return NGX_ERROR;
        }

        dir.len = ngx_strlen(dir.data);
    }

    while (dir.len > 1 && dir.data[dir.len - 1] == '/') {
        dir.len--;
    }

    path.len = dir.len + sizeof("/connector.sock") - 1;
    path.data = ngx_pnalloc(cycle->pool, path.len);
    if (path.data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(path.data, dir.data, dir.len);
    ngx_memcpy(p, "/connector.sock", sizeof("/connector.sock") - 1);

    if (ngx_http_appmanager_set_socket(cycle->pool, cycle->log, mcf, &path)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    argv = ngx_http_appmanager_core_argv(cycle, mcf, &dir, &path);
    if (argv == NULL) {
        return NGX_ERROR;
    }

    if (pipe(lifeline) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "appmanager: pipe() failed");
        return NGX_ERROR;
    }

    if (pipe(report) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "appmanager: pipe() failed");
        close(lifeline[0]);
        close(lifeline[1]);
        return NGX_ERROR;
    }

    /*
     * The write end stays in the master and the workers it forks, but not in
     * programs they run (a new nginx binary starts its own core). The report
     * pipe closes on exec, telling the master that the command ran.
     */
    (void) fcntl(lifeline[1], F_SETFD, FD_CLOEXEC);
    (void) fcntl(report[0], F_SETFD, FD_CLOEXEC);
    (void) fcntl(report[1], F_SETFD, FD_CLOEXEC);

    pid = fork();

    if (pid == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "appmanager: fork() failed");
        close(lifeline[0]);
        close(lifeline[1]);
        close(report[0]);
        close(report[1]);
        return NGX_ERROR;
    }

    if (pid == 0) {
        ngx_http_appmanager_exec_core(argv, lifeline[0], report[1]);
    }

    close(lifeline[0]);
    close(report[1]);

    do {
        n = read(report[0], &err, sizeof(int));
    } while (n == -1 && ngx_errno == NGX_EINTR);

    close(report[0]);

    if (n == sizeof(int)) {
        (void) waitpid(pid, NULL, 0);
        close(lifeline[1]);

        ngx_log_error(NGX_LOG_EMERG, cycle->log, err,
                      "appmanager: cannot run the core command \"%s\" "
                      "(appmanager_core_command)", argv[0]);
        return NGX_ERROR;
    }

    if (ngx_http_appmanager_wait_for_core(cycle, pid, &path) != NGX_OK) {
        close(lifeline[1]);
        return NGX_ERROR;
    }

    if (fstat(lifeline[1], &st) == -1) {
        close(lifeline[1]);
        return NGX_ERROR;
    }

    value = ngx_alloc(NGX_INT64_LEN * 4 + 4 + path.len + 1, cycle->log);
    if (value == NULL) {
        close(lifeline[1]);
        return NGX_ERROR;
    }

    *ngx_sprintf((u_char *) value, "%P %d %L %L %V", pid, lifeline[1],
                 (int64_t) st.st_dev, (int64_t) st.st_ino, &path) = '\0';

    if (setenv(NGX_HTTP_APPMANAGER_ENV, value, 1) == -1) {
        ngx_free(value);
        close(lifeline[1]);
        return NGX_ERROR;
    }

    ngx_free(value);

    ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                  "appmanager: core started (pid %P) on %V", pid, &path);

    return NGX_OK;
}


/*
 * <core_command> core --socket S --instance-dir D [--connector-user U]
 * --lifeline-fd 3 [--<core setting> VALUE ...]
 */
static char **
ngx_http_appmanager_core_argv(ngx_cycle_t *cycle,
    ngx_http_appmanager_main_conf_t *mcf, ngx_str_t *dir, ngx_str_t *path)
{
    char             **arg, *user;
    u_char            *option;
    ngx_str_t         *v, *command, *name;
    ngx_uint_t         id, i, j;
    ngx_array_t       *argv;
    struct passwd     *pw;
    ngx_core_conf_t   *ccf;
    ngx_open_file_t   *log;

    static ngx_str_t  default_command =
                          ngx_string(NGX_HTTP_APPMANAGER_CORE_COMMAND);

    argv = ngx_array_create(cycle->pool, 16, sizeof(char *));
    if (argv == NULL) {
        return NULL;
    }

#define ngx_http_appmanager_arg(data, len)                                    \
    arg = ngx_array_push(argv);                                               \
    if (arg == NULL) {                                                        \
        return NULL;                                                          \
    }                                                                         \
    *arg = ngx_http_appmanager_cstring(cycle->pool, (u_char *) (data), len);  \
    if (*arg == NULL) {                                                       \
        return NULL;                                                          \
    }

    command = mcf->values[AM_S_CORE_COMMAND]
              ? mcf->values[AM_S_CORE_COMMAND]->elts : &default_command;

    ngx_http_appmanager_arg(command->data, command->len);
    ngx_http_appmanager_arg("core", 4);
    ngx_http_appmanager_arg("--socket", 8);
    ngx_http_appmanager_arg(path->data, path->len);
    ngx_http_appmanager_arg("--instance-dir", 14);
    ngx_http_appmanager_arg(dir->data, dir->len);

    /* the workers' user may connect to the socket, besides root and the core */
    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);
    user = ccf->username;

    if (user == NULL) {
        pw = getpwuid(geteuid());
        user = pw ? pw->pw_name : NULL;
    }

    if (user != NULL) {
        ngx_http_appmanager_arg("--connector-user", 16);
        ngx_http_appmanager_arg(user, ngx_strlen(user));
    }

    ngx_http_appmanager_arg("--lifeline-fd", 13);
    ngx_http_appmanager_arg("3", 1);

    for (id = 0; id < NGX_HTTP_APPMANAGER_NSETTINGS; id++) {
        if (ngx_http_appmanager_settings[id].role != AM_ROLE_CORE
            || id == AM_S_INSTANCE_DIR || mcf->values[id] == NULL)
        {
            continue;
        }

        name = &ngx_http_appmanager_settings[id].name;
        v = mcf->values[id]->elts;

        /* --max-pool-size for max_pool_size */
        option = ngx_pnalloc(cycle->pool, 2 + name->len);
        if (option == NULL) {
            return NULL;
        }

        option[0] = '-';
        option[1] = '-';

        for (j = 0; j < name->len; j++) {
            option[2 + j] = (name->data[j] == '_') ? '-' : name->data[j];
        }

        for (i = 0; i < mcf->values[id]->nelts; i++) {
            ngx_http_appmanager_arg(option, 2 + name->len);
            ngx_http_appmanager_arg(v[i].data, v[i].len);
        }
    }

    /*
     * Without a log file of its own the core writes to nginx's error log,
     * as Passenger's core does: after nginx detaches, its standard error
     * leads nowhere.
     */
    log = cycle->log->file;

    if (mcf->values[AM_S_LOG_FILE] == NULL && log != NULL
        && log->name.len > 0 && log->name.data[0] == '/')
    {
        ngx_http_appmanager_arg("--log-file", 10);
        ngx_http_appmanager_arg(log->name.data, log->name.len);
    }

#undef ngx_http_appmanager_arg

    arg = ngx_array_push(argv);
    if (arg == NULL) {
        return NULL;
    }

    *arg = NULL;

    return argv->elts;
}


/*
 * The core listens within a second or two; nginx's start waits for it, so
 * that the first request finds it, and fails if the core exits first.
 */
static ngx_int_t
ngx_http_appmanager_wait_for_core(ngx_cycle_t *cycle, ngx_pid_t pid,
    ngx_str_t *path)
{
    int                 status;
    ngx_msec_t          waited;
    ngx_socket_t        s;
    ngx_http_appmanager_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_appmanager_module);

    for (waited = 0; /* void */; waited += 50) {

        if (waitpid(pid, &status, WNOHANG) == pid) {
            if (WIFEXITED(status)) {
                ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                              "appmanager: the core exited with status %d "
                              "before listening on %V; its log says why",
                              WEXITSTATUS(status), path);
            } else {
                ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                              "appmanager: the core was killed by signal %d "
                              "before listening on %V",
                              WTERMSIG(status), path);
            }

            return NGX_ERROR;
        }

        s = ngx_socket(AF_UNIX, SOCK_STREAM, 0);
        if (s == (ngx_socket_t) -1) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_socket_errno,
                          "appmanager: socket() failed");
            return NGX_ERROR;
        }

        if (connect(s, (struct sockaddr *) &mcf->sockaddr, mcf->socklen)
            == 0)
        {
            ngx_close_socket(s);
            return NGX_OK;
        }

        ngx_close_socket(s);

        if (waited >= NGX_HTTP_APPMANAGER_START_WAIT) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                          "appmanager: the core (pid %P) did not listen on "
                          "%V within %M s; stopped it",
                          pid, path, NGX_HTTP_APPMANAGER_START_WAIT / 1000);
            (void) kill(pid, SIGKILL);
            (void) waitpid(pid, NULL, 0);
            return NGX_ERROR;
        }

        ngx_msleep(50);
    }
}


/* In the forked child: becomes the core, or reports why it could not. */
static void
ngx_http_appmanager_exec_core(char **argv, int lifeline, int report)
{
    int       fd, err, null;
    long      max;
    sigset_t  set;

    /*
     * nginx's master blocks and ignores signals the core needs: exec keeps
     * both the mask and ignored dispositions.
     */
    sigemptyset(&set);
    (void) sigprocmask(SIG_SETMASK, &set, NULL);

    for (fd = 1; fd < NSIG; fd++) {
        (void) signal(fd, SIG_DFL);
    }

    /* lift both above the low numbers before placing them there */
    lifeline = fcntl(lifeline, F_DUPFD, 10);
    report = fcntl(report, F_DUPFD_CLOEXEC, 10);

    if (lifeline == -1 || report == -1
        || dup2(lifeline, NGX_HTTP_APPMANAGER_LIFELINE_FD) == -1
        || dup3(report, NGX_HTTP_APPMANAGER_REPORT_FD, O_CLOEXEC) == -1)
    {
        _exit(127);
    }

    /*
     * The core's banner is not nginx's to print: only its log, on standard
     * error or in its log file, is kept.
     */
    null = open("/dev/null", O_RDWR);
    if (null != -1) {
        (void) dup2(null, 0);
        (void) dup2(null, 1);
    }

    /* nginx's listening sockets, logs and pipes are none of the core's */
#if defined(SYS_close_range)
    if (syscall(SYS_close_range, NGX_HTTP_APPMANAGER_REPORT_FD + 1, ~0U, 0)
        != 0)
#endif
    {
        max = sysconf(_SC_OPEN_MAX);

        for (fd = NGX_HTTP_APPMANAGER_REPORT_FD + 1; fd < max; fd++) {
            (void) close(fd);
        }
    }

    execvp(argv[0], argv);

    err = errno;
    (void) write(NGX_HTTP_APPMANAGER_REPORT_FD, &err, sizeof(int));
    _exit(127);
}


static char *
ngx_http_appmanager_cstring(ngx_pool_t *pool, u_char *data, size_t len)
{
    u_char  *p;

    p = ngx_pnalloc(pool, len + 1);
    if (p == NULL) {
        return NULL;
    }

    ngx_memcpy(p, data, len);
    p[len] = '\0';

    return (char *) p;
}
