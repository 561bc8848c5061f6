/* Starting the appmanager core with Apache, and keeping it across Apache's reloads
 * ("Starting the core" in docs/protocol/connector.md).
 *
 * Lifetime: the core is started by Apache's master process when it has read its configuration
 * for real (the second time at start-up), and lives as long as the master: a graceful or full
 * restart keeps it, because its record lives in the process pool, which outlives every
 * configuration. It stops on its own when every Apache process is gone, through the lifeline: the
 * read end of a pipe whose write end the master and its children hold. The master restarts a core
 * that exits while Apache runs.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "am_apache.h"

#include "http_log.h"
#include "ap_mpm.h"
#include "mpm_common.h"
#include "unixd.h"
#include "apr_file_info.h"
#include "apr_strings.h"
#include "apr_thread_proc.h"

#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include("am_build.h")
/* Written by `appmanager apache-module build`: AM_DEFAULT_CORE_COMMAND, the appmanager
 * executable that built the module. */
#include "am_build.h"
#endif
#endif
#ifndef AM_DEFAULT_CORE_COMMAND
#define AM_DEFAULT_CORE_COMMAND "appmanager"
#endif

APLOG_USE_MODULE(appmanager);

/* The descriptor the core reads its lifeline from. */
#define AM_LIFELINE_FD 3
/* How long the core gets to listen on its socket. */
#define AM_START_TIMEOUT apr_time_from_sec(30)
/* A core that dies sooner than this after starting is not restarted: it would die again. */
#define AM_MIN_LIFETIME apr_time_from_sec(5)

/* The core's record, in the process pool. Plain data only: Apache unloads and reloads this
 * module's code on every restart, so nothing here may point into it. */
typedef struct {
    apr_proc_t proc;    /* proc.pid is 0 when no core runs */
    int lifeline;       /* the write end of the lifeline, -1 when no core runs */
    apr_time_t started;
    const char *socket; /* in the process pool */
} am_core_state;

/* What restarting the core needs; one per configuration (pconf). */
typedef struct {
    am_core_state *state;
    const char *const *argv;
    server_rec *server;
} am_core_launch;

static const char am_state_key[] = "appmanager-core";

/* In the forked child: the core's descriptors (stdin /dev/null, stdout and stderr Apache's error
 * log, the lifeline, nothing else), default signal handling, a session of its own (a Ctrl-C for
 * Apache in a terminal is not for the core: it stops when Apache is gone), then exec. */
static void am_exec_core(const char *const *argv, int lifeline_read)
{
    sigset_t none;
    int sig, fd, devnull;

    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (sig = 1; sig < NSIG; sig++) {
        signal(sig, SIG_DFL);
    }
    setsid();
    if (lifeline_read == AM_LIFELINE_FD) {
        fcntl(AM_LIFELINE_FD, F_SETFD, 0);
    }
    else {
        dup2(lifeline_read, AM_LIFELINE_FD); /* dup2 clears close-on-exec */
    }
    devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0 && devnull != 0) {
        dup2(devnull, 0);
    }
    dup2(2, 1);
#ifdef SYS_close_range
    if (syscall(SYS_close_range, AM_LIFELINE_FD + 1, ~0U, 0) != 0)
#endif
    {
        long max = sysconf(_SC_OPEN_MAX);
        if (max < 0 || max > 65536) {
            max = 65536;
        }
        for (fd = AM_LIFELINE_FD + 1; fd < max; fd++) {
            close(fd);
        }
    }
    execvp(argv[0], (char *const *)argv);
    fprintf(stderr, "mod_appmanager: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

static const char *am_spawn(apr_pool_t *p, am_core_state *st, const char *const *argv)
{
    int life[2];
    pid_t pid;

    if (pipe2(life, O_CLOEXEC) != 0) {
        return apr_psprintf(p, "cannot create the core's lifeline: %s", strerror(errno));
    }
    pid = fork();
    if (pid < 0) {
        close(life[0]);
        close(life[1]);
        return apr_psprintf(p, "cannot fork the core: %s", strerror(errno));
    }
    if (pid == 0) {
        am_exec_core(argv, life[0]);
    }
    close(life[0]);
    /* The write end stays open, close-on-exec, in the master and every child it forks: CGI
     * scripts and piped loggers that Apache execs do not keep the core alive. */
    st->proc.pid = pid;
    st->lifeline = life[1];
    st->started = apr_time_now();
    return NULL;
}

static void am_forget_core(am_core_state *st)
{
    st->proc.pid = 0;
    if (st->lifeline >= 0) {
        close(st->lifeline);
        st->lifeline = -1;
    }
}

static const char *am_describe_status(apr_pool_t *p, int status)
{
    if (WIFEXITED(status)) {
        return apr_psprintf(p, "exit status %d", WEXITSTATUS(status));
    }
    if (WIFSIGNALED(status)) {
        return apr_psprintf(p, "signal %d", WTERMSIG(status));
    }
    return apr_psprintf(p, "wait status %d", status);
}

static int am_socket_accepts(const char *path)
{
    struct sockaddr_un addr;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int ok;

    if (fd < 0) {
        return 0;
    }
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    apr_cpystrn(addr.sun_path, path, sizeof(addr.sun_path));
    ok = connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0;
    close(fd);
    return ok;
}

/* Wait until the core accepts connections; fail with its exit status if it exits first. */
static const char *am_wait_for_socket(apr_pool_t *p, am_core_state *st, const char *path)
{
    apr_time_t deadline = apr_time_now() + AM_START_TIMEOUT;
    int status;

    while (apr_time_now() < deadline) {
        pid_t done = waitpid(st->proc.pid, &status, WNOHANG);
        if (done == st->proc.pid) {
            am_forget_core(st);
            return apr_psprintf(p,
                                "the appmanager core exited with %s before listening on %s "
                                "(its output is in the error log)",
                                am_describe_status(p, status), path);
        }
        if (am_socket_accepts(path)) {
            return NULL;
        }
        apr_sleep(apr_time_from_msec(50));
    }
    kill(st->proc.pid, SIGTERM);
    return apr_psprintf(p, "the appmanager core (pid %ld) did not listen on %s within 30 s",
                        (long)st->proc.pid, path);
}

/* The core's connector secret (connector.md): the core writes it next to its socket, readable
 * by its own user only, before the socket accepts. Apache's master (root, or the core's user)
 * reads it here, before it forks its children, which send it with every request. */
static const char *am_read_secret(apr_pool_t *pconf, apr_pool_t *ptemp, const char *socket,
                                  const char **secret)
{
    const char *path = apr_pstrcat(ptemp, socket, ".secret", NULL);
    char buf[256];
    apr_size_t len = sizeof(buf) - 1;
    apr_file_t *f;
    apr_status_t rv;
    char *text;

    *secret = NULL;
    rv = apr_file_open(&f, path, APR_FOPEN_READ, APR_FPROT_OS_DEFAULT, ptemp);
    if (APR_STATUS_IS_ENOENT(rv)) {
        return apr_psprintf(ptemp,
                            "the core listening on %s wrote no secret (%s): is it an appmanager "
                            "core of the same version as this module?",
                            socket, path);
    }
    if (rv == APR_SUCCESS) {
        rv = apr_file_read(f, buf, &len);
        apr_file_close(f);
    }
    if (rv != APR_SUCCESS) {
        char err[120];
        return apr_psprintf(ptemp,
                            "cannot read the core's secret %s: %s (Apache must start as root or "
                            "as the core's user)",
                            path, apr_strerror(rv, err, sizeof(err)));
    }
    buf[len] = '\0';
    text = apr_pstrdup(pconf, buf);
    apr_collapse_spaces(text, text);
    if (!*text) {
        return apr_psprintf(ptemp, "the core's secret %s is empty", path);
    }
    *secret = text;
    return NULL;
}

static int am_core_alive(am_core_state *st)
{
    int status;
    pid_t done;

    if (st->proc.pid <= 0) {
        return 0;
    }
    done = waitpid(st->proc.pid, &status, WNOHANG);
    if (done == 0) {
        return 1;
    }
    /* Exited (reaped now, or already by the master's loop). */
    am_forget_core(st);
    return 0;
}

static void am_core_maintenance(int reason, void *data, int status)
{
    am_core_launch *launch = data;
    am_core_state *st = launch->state;
    apr_pool_t *p;
    const char *err;
    int mpm_state = AP_MPMQ_STOPPING;
    int restart;

    if (reason != APR_OC_REASON_DEATH && reason != APR_OC_REASON_LOST) {
        return; /* Apache restarting (the core stays) or this configuration going away */
    }
    apr_pool_create(&p, NULL);
    ap_mpm_query(AP_MPMQ_MPM_STATE, &mpm_state);
    restart = mpm_state == AP_MPMQ_RUNNING && apr_time_now() - st->started >= AM_MIN_LIFETIME;
    ap_log_error(APLOG_MARK, restart ? APLOG_ERR : APLOG_NOTICE, 0, launch->server,
                 "mod_appmanager: the appmanager core (pid %ld) exited with %s%s",
                 (long)st->proc.pid,
                 reason == APR_OC_REASON_LOST ? "an unknown status" : am_describe_status(p, status),
                 restart ? "; starting a new one" : "");
    am_forget_core(st);
    if (restart) {
        if ((err = am_spawn(p, st, launch->argv)) != NULL) {
            ap_log_error(APLOG_MARK, APLOG_ERR, 0, launch->server, "mod_appmanager: %s", err);
        }
        else {
            apr_proc_other_child_unregister(launch);
            apr_proc_other_child_register(&st->proc, am_core_maintenance, launch, NULL,
                                          launch->server->process->pconf);
            /* The new core has a new secret, which the children must send: a graceful restart
             * reads it (once the core listens) and gives it to new children. */
            kill(getpid(), AP_SIG_GRACEFUL);
        }
    }
    apr_pool_destroy(p);
}

/* The user Apache's children run as (mod_unixd's User): the one the core lets connect besides
 * its own user. None when Apache does not start as root, for then they run as its own user. */
static const char *am_worker_user(apr_pool_t *p)
{
    const char *name = ap_unixd_config.user_name;

    if (geteuid() != 0 || name == NULL) {
        return NULL;
    }
    if (name[0] == '#') {
        struct passwd *pw = getpwuid((uid_t)atol(name + 1));
        return pw != NULL && pw->pw_uid != 0 ? apr_pstrdup(p, pw->pw_name) : NULL;
    }
    return name;
}

/* "--max-pool-size" for "max_pool_size". */
static const char *am_option(apr_pool_t *p, const char *name)
{
    char *option = apr_pstrcat(p, "--", name, NULL);
    char *c;

    for (c = option + 2; *c; c++) {
        if (*c == '_') {
            *c = '-';
        }
    }
    return option;
}

/* `<core_command> core --socket ... --lifeline-fd 3 [core settings]` (connector.md). */
static const char *const *am_core_argv(apr_pool_t *p, const am_dir_conf *settings,
                                       const char *socket, const char *instance_dir)
{
    apr_array_header_t *argv = apr_array_make(p, 24, sizeof(const char *));
    const char *command = settings->value[AM_S_CORE_COMMAND];
    const char *user = am_worker_user(p);
    int id, i;

    APR_ARRAY_PUSH(argv, const char *) = command != NULL ? command : AM_DEFAULT_CORE_COMMAND;
    APR_ARRAY_PUSH(argv, const char *) = "core";
    APR_ARRAY_PUSH(argv, const char *) = "--socket";
    APR_ARRAY_PUSH(argv, const char *) = socket;
    APR_ARRAY_PUSH(argv, const char *) = "--instance-dir";
    APR_ARRAY_PUSH(argv, const char *) = instance_dir;
    if (user != NULL) {
        APR_ARRAY_PUSH(argv, const char *) = "--connector-user";
        APR_ARRAY_PUSH(argv, const char *) = user;
    }
    APR_ARRAY_PUSH(argv, const char *) = "--lifeline-fd";
    APR_ARRAY_PUSH(argv, const char *) = apr_itoa(p, AM_LIFELINE_FD);
    for (id = 0; id < AM_NSETTINGS; id++) {
        if (am_settings[id].role != AM_ROLE_CORE || id == AM_S_INSTANCE_DIR) {
            continue;
        }
        if (settings->values[id] != NULL) {
            for (i = 0; i < settings->values[id]->nelts; i++) {
                APR_ARRAY_PUSH(argv, const char *) = am_option(p, am_settings[id].name);
                APR_ARRAY_PUSH(argv, const char *) =
                    APR_ARRAY_IDX(settings->values[id], i, const char *);
            }
        }
        else if (settings->value[id] != NULL) {
            APR_ARRAY_PUSH(argv, const char *) = am_option(p, am_settings[id].name);
            APR_ARRAY_PUSH(argv, const char *) = settings->value[id];
        }
    }
    APR_ARRAY_PUSH(argv, const char *) = NULL;
    return (const char *const *)argv->elts;
}

static am_core_state *am_state(server_rec *s)
{
    void *data = NULL;
    am_core_state *st;

    apr_pool_userdata_get(&data, am_state_key, s->process->pool);
    if (data != NULL) {
        return data;
    }
    st = apr_pcalloc(s->process->pool, sizeof(*st));
    st->lifeline = -1;
    apr_pool_userdata_set(st, am_state_key, apr_pool_cleanup_null, s->process->pool);
    return st;
}

/* Make sure a core serves this configuration and say where its socket is: the one
 * AppManagerCoreSocket names, the core started earlier (Apache reloaded), or a new one. */
const char *am_core_ensure(apr_pool_t *pconf, apr_pool_t *ptemp, server_rec *s,
                           const am_dir_conf *settings, am_core_info *info)
{
    am_core_state *st = am_state(s);
    const char *instance_dir = settings->value[AM_S_INSTANCE_DIR];
    const char *socket, *err;
    am_core_launch *launch;

    if (settings->value[AM_S_CORE_SOCKET] != NULL) {
        if (am_core_alive(st)) {
            /* Reloaded to use a core of its own: ours is not needed any more. */
            kill(st->proc.pid, SIGTERM);
            am_forget_core(st);
        }
        info->socket = settings->value[AM_S_CORE_SOCKET];
        return am_read_secret(pconf, ptemp, info->socket, &info->secret);
    }

    launch = apr_pcalloc(pconf, sizeof(*launch));
    launch->state = st;
    launch->server = s;
    if (am_core_alive(st)) {
        /* Apache reloaded: the core started with it serves on; the new settings of the apps
         * reach it with the next requests' !~App. */
        socket = st->socket;
        /* A changed AppManagerInstanceDir waits for Apache's next start, like the other
         * settings of the core: a new core (should this one die) stays where this one is. */
        launch->argv = am_core_argv(pconf, settings, socket, am_parent_dir(pconf, socket));
        /* (It may have just been restarted: see am_core_maintenance.) */
        if ((err = am_wait_for_socket(ptemp, st, socket)) != NULL) {
            return err;
        }
        ap_log_error(APLOG_MARK, APLOG_INFO, 0, s,
                     "mod_appmanager: the appmanager core (pid %ld) serves on at %s",
                     (long)st->proc.pid, socket);
    }
    else {
        if (instance_dir == NULL) {
            const char *tmp = NULL;
            if (apr_temp_dir_get(&tmp, ptemp) != APR_SUCCESS) {
                tmp = "/tmp";
            }
            /* A name nobody can take first: the core refuses a directory of another user. */
            char *made = apr_pstrcat(pconf, tmp, "/appmanager-apache.XXXXXX", NULL);
            if (mkdtemp(made) == NULL) {
                return apr_psprintf(ptemp, "cannot create the core's instance directory %s: %s",
                                    made, strerror(errno));
            }
            instance_dir = made;
        }
        socket = apr_pstrcat(s->process->pool, instance_dir, "/connector.sock", NULL);
        if (strlen(socket) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
            return apr_psprintf(ptemp, "the core's socket path %s is too long; choose a shorter "
                                       "AppManagerInstanceDir", socket);
        }
        launch->argv = am_core_argv(pconf, settings, socket, instance_dir);
        if ((err = am_spawn(ptemp, st, launch->argv)) != NULL) {
            return err;
        }
        if ((err = am_wait_for_socket(ptemp, st, socket)) != NULL) {
            return err;
        }
        st->socket = socket;
        ap_log_error(APLOG_MARK, APLOG_NOTICE, 0, s,
                     "mod_appmanager: started the appmanager core (pid %ld) on %s",
                     (long)st->proc.pid, socket);
    }
    apr_proc_other_child_register(&st->proc, am_core_maintenance, launch, NULL, pconf);
    info->socket = socket;
    return am_read_secret(pconf, ptemp, socket, &info->secret);
}
