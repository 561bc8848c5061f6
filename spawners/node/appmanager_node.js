'use strict';
/**
 * appmanager's spawner shim for Node apps.
 *
 * The core starts this file with Node's own IPC channel on fd 3 (NODE_CHANNEL_FD=3, JSON lines)
 * and the progress file on fd 4 (docs/protocol/spawn.md; docs/protocol/handoff.md, "Node"). The
 * shim loads the app and takes the http.Server the app listens with, without binding a port; it
 * answers READY, then receives whole client connections over the channel. Each becomes a
 * 'connection' of that server, with the bytes the core already read put back in front, so Node's
 * own HTTP server reads and writes it from then on. The shim keeps each connection's byte of the
 * progress file up to date and reports APPMANAGER_CLOSED when the connection closes. When SPAWN
 * says `"access_log": true`, it also reports each finished response with APPMANAGER_LOG, since the
 * core, which hands over whole connections, sees no requests.
 *
 * Which server: the first http.Server the app calls listen() on while loading or later. An app that
 * never listens but exports an http.Server, or a request listener (an Express app is one), is
 * served through that instead. Request URLs lose the base URI, at a segment boundary, before the
 * app sees them; `req.originalUrl` keeps the full one.
 *
 * Node standard library only: it runs under whatever Node the app uses.
 */

const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const Module = require('node:module');
const { pathToFileURL } = require('node:url');
const { types } = require('node:util');

const PROTOCOL = 1;
const PROGRESS_FD = Number(process.env.APPMANAGER_PROGRESS_FD || 4);

// A connection's byte in the progress file (handoff.md, "Node"). When the process dies the core
// answers 502 on the connections whose byte is RECEIVED and closes the others.
const IDLE = 0;
const RECEIVED = 1;
const RESPONDING = 2;
const STATE_BYTES = [Buffer.from([IDLE]), Buffer.from([RECEIVED]), Buffer.from([RESPONDING])];

// An ERROR message's traceback is cut to its end beyond this; the end is the useful part.
const MAX_TRACEBACK = 64 * 1024;
// The core is gone (or wants us gone) once the channel closes; in-flight responses get this long.
const DISCONNECT_GRACE_MS = 2000;
// SIGTERM (and the app closing its server) lets in-flight responses finish, within this.
const TERM_GRACE_MS = 10000;
// After an uncaught exception, how long the 500 pages get to reach their clients.
const CRASH_GRACE_MS = 1000;
// An app that neither listens nor exports a server gets a line in the log after this long, so that
// the core's start_timeout error says what was awaited.
const LISTEN_NOTE_MS = 5000;

const kConnection = Symbol('appmanager.connection');
// Set on tracked responses only when the access log is on: the request (the URL as received, before
// the base URI comes off it), the body bytes written, and whether its line went out.
const kRequest = Symbol('appmanager.request');
const kUrl = Symbol('appmanager.url');
const kBytes = Symbol('appmanager.bytes');
const kLogged = Symbol('appmanager.logged');

class ProtocolError extends Error {
  /** The core sent something this shim cannot read; a bug on one side or a version mismatch. */
}
ProtocolError.prototype.name = 'ProtocolError';

// What the shim knows, for the life of the process. `step` is the spawn step under way until READY.
const shim = {
  step: 'PREPARE',
  spawning: false, // the first message came
  answered: false, // READY or ERROR went out
  config: null,
  server: null, // the http.Server that takes the connections
  serverFromExports: false, // taken from module.exports, so a later listen() call replaces it
  onServer: null, // resolves the wait in LISTEN
  connections: new Set(),
  stopping: false,
  stopTimer: null,
  stopDeadline: Infinity,
  crashing: false,
};

// The handshake

/** The APPMANAGER_SPAWN message's fields; unknown keys are ignored (spawn.md). */
function spawnConfig(message) {
  if (message === null || typeof message !== 'object' || message.cmd !== 'APPMANAGER_SPAWN') {
    const text = JSON.stringify(message) ?? String(message);
    throw new ProtocolError(`expected an APPMANAGER_SPAWN message, got ${text.slice(0, 80)}`);
  }
  for (const key of ['app_root', 'startup_file']) {
    if (typeof message[key] !== 'string' || message[key] === '') {
      throw new ProtocolError(`APPMANAGER_SPAWN message lacks or mangles ${key}`);
    }
  }
  const baseUri = String(message.base_uri || '').replace(/\/+$/, '');
  return {
    protocol: Number(message.protocol),
    appRoot: message.app_root,
    appType: String(message.app_type ?? 'node'),
    startupFile: message.startup_file,
    environment: String(message.environment || 'production'),
    // "/" or "/app/" mean the same mount point as "" and "/app".
    baseUri: baseUri === '' || baseUri.startsWith('/') ? baseUri : `/${baseUri}`,
    appName: String(message.app_name ?? ''),
    // Report each response for the core's access log (APPMANAGER_LOG).
    accessLog: message.access_log === true,
  };
}

/** Step PREPARE: checks the protocol and the progress file, enters the app root. */
function prepare(config) {
  if (config.protocol !== PROTOCOL) {
    throw new ProtocolError(
      `the core speaks protocol ${config.protocol}; this shim speaks ${PROTOCOL}`,
    );
  }
  if (config.appType !== 'node') {
    const appType = JSON.stringify(config.appType);
    throw new ProtocolError(`app_type ${appType} is not served by the Node shim`);
  }
  try {
    fs.fstatSync(PROGRESS_FD);
  } catch (err) {
    throw new ProtocolError(`fd ${PROGRESS_FD} is not the progress file (${err.code})`);
  }
  // Nothing to mark close-on-exec here: Node's start-up (uv_disable_stdio_inheritance) marks
  // inherited descriptors, the first 16 always, fds 3 and 4 among them; its IPC channel receives
  // descriptors with MSG_CMSG_CLOEXEC. Subprocesses of the app hold neither channel nor clients.
  process.chdir(config.appRoot);
  // The core sets it too; a value the user gave the app wins.
  if (!process.env.NODE_ENV) process.env.NODE_ENV = config.environment;
}

/**
 * Step LOAD_APP: loads the startup file as the main module, as `node app.js` would, so that the
 * common `if (require.main === module) app.listen(...)` still listens. Returns what it exports.
 */
async function loadApp(config) {
  hookListen();
  hookServerResponse();
  if (config.accessLog) hookResponseBytes();
  process.argv[1] = config.startupFile;
  let exported;
  try {
    exported = Module._load(config.startupFile, null, true);
  } catch (err) {
    // An ES module: import() loads it (require() can, in newer Nodes, unless it awaits at the top).
    if (err?.code !== 'ERR_REQUIRE_ESM' && err?.code !== 'ERR_REQUIRE_ASYNC_MODULE') throw err;
    exported = await import(pathToFileURL(config.startupFile).href);
  }
  return types.isModuleNamespaceObject(exported) ? exported.default : exported;
}

/**
 * Step LISTEN: the server to hand connections to. A server the app listened on wins; an app that
 * did not listen while loading but exports an http.Server or a request listener is served through
 * that at once (a later listen() call takes over); otherwise the wait for listen() lasts until the
 * core's start_timeout.
 */
async function findServer(exported) {
  if (shim.server === null) {
    if (exported instanceof http.Server) {
      takeServer(exported, defaultAddress(), true);
      process.nextTick(emitListening, exported);
    } else if (typeof exported === 'function') {
      const server = http.createServer(exported);
      takeServer(server, defaultAddress(), true);
      process.nextTick(emitListening, server);
    } else {
      const note = setTimeout(() => {
        log(
          'waiting for the app to call listen() on an http.Server; it exports no server or ' +
            'request listener to serve instead',
        );
      }, LISTEN_NOTE_MS);
      await new Promise((resolve) => {
        shim.onServer = resolve;
      });
      clearTimeout(note);
    }
  }
  process.on('SIGTERM', () => stop(TERM_GRACE_MS));
}

function send(message, callback = onSendDone) {
  if (process.connected) process.send(message, callback);
}

function onSendDone(err) {
  // The core went away; 'disconnect' follows and stops us.
  if (err && !shim.stopping) log(`control channel failed: ${err.message}`);
}

/** The APPMANAGER_ERROR message for an exception raised during `step`. */
function failureMessage(step, err) {
  let traceback = err instanceof Error ? String(err.stack) : '';
  if (traceback.length > MAX_TRACEBACK) traceback = `...\n${traceback.slice(-MAX_TRACEBACK)}`;
  let message = String(err);
  if (err instanceof Error) {
    const name = err.name || err.constructor?.name || 'Error';
    message = err.message ? `${name}: ${err.message}` : name;
  }
  return { cmd: 'APPMANAGER_ERROR', step, message, traceback };
}

/** Reports a failed spawn and exits with status 1 once the report is written. */
function failSpawn(err) {
  if (shim.answered) return;
  shim.answered = true;
  const message = failureMessage(shim.step, err);
  if (!process.connected) {
    log(`${shim.step} failed and the core is gone:\n${message.traceback || message.message}`);
    process.exit(1);
  }
  process.send(message, (sendErr) => {
    if (sendErr) log(`${shim.step} failed:\n${message.traceback || message.message}`);
    process.exit(1);
  });
}

/** A process.exit() while loading is a failed spawn too; the report goes out if the channel can
 * take it at once, which it nearly always can. */
function onExitBeforeReady(code) {
  if (shim.answered || !process.connected) return;
  shim.answered = true;
  const err = new Error(`the app called process.exit(${code}) during ${shim.step}`);
  process.send(failureMessage(shim.step, err));
}

// Taking the app's server

/**
 * Makes listen() on the app's first http.Server take it as the served server instead of binding a
 * port. Other servers, and later ones, listen as they asked: an app's second port (admin, metrics)
 * keeps working.
 */
function hookListen() {
  const listen = net.Server.prototype.listen;
  let noted = false;
  net.Server.prototype.listen = function appmanagerListen(...args) {
    if (!(this instanceof http.Server)) {
      if (shim.server === null && !noted) {
        noted = true;
        log(
          'a server that is not an http.Server (an https or a net one) listens on a port of its ' +
            "own; the core's connections go to the first http.Server that listens, TLS done",
        );
      }
      return Reflect.apply(listen, this, args);
    }
    if (shim.server !== null && !shim.serverFromExports) {
      if (this === shim.server) {
        const err = new Error('Listen method has been called more than once without closing.');
        err.code = 'ERR_SERVER_ALREADY_LISTEN';
        throw err;
      }
      return Reflect.apply(listen, this, args);
    }
    const callback = typeof args[args.length - 1] === 'function' ? args.pop() : null;
    if (this === shim.server) {
      // The exported server, now listening as the app meant it to.
      shim.serverFromExports = false;
      this.address = takenAddress(requestedAddress(args));
    } else {
      takeServer(this, requestedAddress(args), false);
    }
    if (callback !== null) this.once('listening', callback);
    process.nextTick(emitListening, this);
    return this;
  };
}

/** The address the app asked to listen on, for server.address(): a pipe's path, or loopback. */
function requestedAddress(args) {
  let where = args[0];
  if (where !== null && typeof where === 'object') where = where.path ?? where.port;
  if (typeof where === 'string' && !/^\d+$/.test(where)) return where;
  const port = Number(where);
  return { address: '127.0.0.1', family: 'IPv4', port: Number.isInteger(port) ? port : 0 };
}

function defaultAddress() {
  return { address: '127.0.0.1', family: 'IPv4', port: 0 };
}

/** server.address() for the served server; a copy each time, as Node's is. */
function takenAddress(address) {
  return () => (typeof address === 'string' ? address : { ...address });
}

/** Makes `server` the one that takes connections; it looks listening to the app. */
function takeServer(server, address, fromExports) {
  shim.server = server;
  shim.serverFromExports = fromExports;
  Object.defineProperty(server, 'listening', {
    configurable: true,
    enumerable: true,
    get: () => !shim.stopping,
  });
  server.address = takenAddress(address);
  server.close = closeServer;
  trackRequests(server);
  if (shim.onServer !== null) shim.onServer();
}

function emitListening(server) {
  // Also starts Node's tracking of the server's connections (request and headers timeouts).
  server.emit('listening');
}

/** server.close() on the served server: the same graceful stop as SIGTERM; the process exits. */
function closeServer(callback) {
  if (typeof callback === 'function') this.once('close', callback);
  stop(TERM_GRACE_MS);
  return this;
}

/**
 * Wraps the server's emit: every request is tracked in the progress file, loses the base URI,
 * and runs its listeners inside a try, so that a listener's synchronous throw costs one 500, not
 * the process. Cheaper per request than a listener of our own.
 */
function trackRequests(server) {
  const emit = server.emit;
  const accessLog = shim.config.accessLog;
  server.emit = function appmanagerEmit(event, req, res) {
    if (event === 'request' || event === 'checkContinue' || event === 'checkExpectation') {
      const conn = req.socket[kConnection];
      if (conn !== undefined) {
        res[kConnection] = conn;
        conn.unparsed = false;
        conn.received++;
        conn.last = res;
        if (shim.stopping) res.shouldKeepAlive = false;
        if (accessLog) {
          res[kRequest] = req;
          res[kUrl] = req.url;
          res[kBytes] = 0;
        }
      }
      if (shim.config.baseUri !== '') stripBaseUri(req);
      try {
        return emit.call(this, event, req, res);
      } catch (err) {
        requestFailed(err, req, res);
        return true;
      } finally {
        // After the listeners: a response they began needs no RECEIVED written first.
        if (conn !== undefined) conn.update();
      }
    }
    if (event === 'upgrade' || event === 'connect') {
      // The app owns the connection's bytes from here on: no 502 from the core into them.
      const conn = req.socket[kConnection];
      if (conn !== undefined) {
        conn.upgraded = true;
        conn.write(RESPONDING);
        // Logged when the connection closes, without a status: the app answers on the socket.
        if (accessLog) conn.upgrade = { [kRequest]: req, [kUrl]: req.url, [kBytes]: null };
      }
      if (shim.config.baseUri !== '') stripBaseUri(req);
    }
    return Reflect.apply(emit, this, arguments);
  };
}

/** Removes the base URI from req.url at a segment boundary: "/app", "/app/x" and "/app?q" are
 * under "/app"; "/apple" is not. Express reads req.originalUrl as the full URL. */
function stripBaseUri(req) {
  const url = req.url;
  const base = shim.config.baseUri;
  if (!url.startsWith(base)) return;
  const next = url.charCodeAt(base.length);
  if (Number.isNaN(next)) {
    req.originalUrl = url;
    req.url = '/';
  } else if (next === 47 /* / */) {
    req.originalUrl = url;
    req.url = url.slice(base.length);
  } else if (next === 63 /* ? */) {
    req.originalUrl = url;
    req.url = `/${url.slice(base.length)}`;
  }
}

/**
 * Counts each tracked response's head and end in its connection's progress, on the prototype
 * rather than with listeners on every response: cheaper per request.
 *
 * writeHead stores the head, which goes out with the first body write, so counting after the
 * call is still before the first byte; a writeHead that throws (a bad status code) counts
 * nothing. Node's server detaches a response from its socket once the response has finished,
 * before the next pipelined one takes the socket; a response cut short by its socket's end is
 * never detached, but then the connection is gone too.
 */
function hookServerResponse() {
  const proto = http.ServerResponse.prototype;
  const writeHead = proto.writeHead;
  const detachSocket = proto.detachSocket;
  const accessLog = shim.config.accessLog;
  function appmanagerWriteHead() {
    const result = Reflect.apply(writeHead, this, arguments);
    const conn = this[kConnection];
    if (conn !== undefined) {
      conn.started++;
      conn.update();
    }
    return result;
  }
  proto.writeHead = appmanagerWriteHead;
  proto.writeHeader = appmanagerWriteHead;
  proto.detachSocket = function appmanagerDetachSocket(socket) {
    detachSocket.call(this, socket);
    const conn = this[kConnection];
    if (conn !== undefined) {
      conn.done++;
      if (accessLog && this[kBytes] !== undefined) logResponse(conn, this);
      conn.update();
      if (shim.stopping && conn.done === conn.received) socket.destroySoon();
    }
  };
}

/**
 * Counts the body bytes of each tracked response, for APPMANAGER_LOG; installed only when the
 * access log is on. A write the response drops (HEAD, 204, 304: Node's `_hasBody`), or one after
 * its end, counts nothing. `end` writes its chunk without calling `write`.
 */
function hookResponseBytes() {
  const proto = http.ServerResponse.prototype;
  const write = proto.write;
  const end = proto.end;
  proto.write = function appmanagerWrite(chunk, encoding) {
    const ended = this.writableEnded;
    const result = Reflect.apply(write, this, arguments);
    if (!ended && this._hasBody !== false && this[kBytes] !== undefined) {
      this[kBytes] += byteLength(chunk, encoding);
    }
    return result;
  };
  proto.end = function appmanagerEnd(chunk, encoding) {
    const ended = this.writableEnded;
    const result = Reflect.apply(end, this, arguments);
    if (!ended && this._hasBody !== false && this[kBytes] !== undefined) {
      this[kBytes] += byteLength(chunk, encoding);
    }
    return result;
  };
}

function byteLength(chunk, encoding) {
  if (typeof chunk === 'string') {
    return Buffer.byteLength(chunk, typeof encoding === 'string' ? encoding : 'utf8');
  }
  return chunk !== null && typeof chunk === 'object' && Number.isInteger(chunk.byteLength)
    ? chunk.byteLength
    : 0;
}

/**
 * APPMANAGER_LOG for a response (or an upgrade): the request line as received, the status and the
 * body bytes once the head went out (null, logged as -, when it never did), referer and agent.
 * Sent before the connection's APPMANAGER_CLOSED, which ends the core's record of it.
 */
function logResponse(conn, res) {
  if (res[kLogged] === true) return;
  res[kLogged] = true;
  const req = res[kRequest];
  const sent = res[kBytes] !== null && res.headersSent === true;
  send({
    cmd: 'APPMANAGER_LOG',
    seq: conn.seq,
    request: `${req.method} ${res[kUrl]} HTTP/${req.httpVersion}`,
    status: sent ? res.statusCode : null,
    bytes: sent ? res[kBytes] : null,
    referer: headerValue(req.headers.referer),
    user_agent: headerValue(req.headers['user-agent']),
  });
}

function headerValue(value) {
  return typeof value === 'string' ? value : null;
}

// Connections and progress

/**
 * One client connection the core handed over, from APPMANAGER_CONN until its socket closes.
 *
 * Keeps the connection's byte of the progress file. Its phase is RECEIVED while a request has
 * arrived whose response has not begun, RESPONDING while one is being written, IDLE otherwise.
 * Responses on a connection go out in request order (pipelining included), so three counters
 * tell which: `received` >= `done`, and `started` counts the heads among them.
 *
 * The byte follows the phase lazily, because the core reads it only once the process is dead, and
 * reads 0 and 2 alike ("close the connection"); only 1 ("answer 502") must never be there once a
 * response has begun. So RECEIVED is written once the request's listeners have returned and the
 * promise callbacks they queued have run, and only if the response has not begun by then (and at
 * once if the process exits first); leaving RECEIVED is written at once; 0 follows 2 when the
 * response ends. A request answered at once, or after one await, costs no write at all, where
 * writing every change costs three (a pwrite each; together a tenth of a hello-world request);
 * the price is that a process killed outright (SIGKILL, a native crash) in that moment gets its
 * request closed rather than answered 502. Once closed, the slot is the core's again and nothing
 * writes to it.
 */
class Connection {
  constructor(seq, slot, socket, server, firstRequestRead) {
    this.seq = seq;
    this.slot = slot;
    this.socket = socket;
    this.server = server;
    this.received = 0;
    this.started = 0;
    this.done = 0;
    // The core read (part of) a request that the HTTP parser has yet to see.
    this.unparsed = firstRequestRead;
    this.state = IDLE; // the byte in the progress file
    this.flushQueued = false;
    this.last = null; // the response to the latest request, for a stop
    this.upgraded = false;
    this.upgrade = null; // with the access log on, an upgrade request to log at the end
    this.closed = false;
  }

  phase() {
    if (this.done < this.received) return this.started > this.done ? RESPONDING : RECEIVED;
    return this.unparsed ? RECEIVED : IDLE;
  }

  /** Brings the byte in line with the phase, after a request, a head or an end of response. */
  update() {
    if (this.upgraded || this.closed) return;
    const phase = this.phase();
    if (phase === RECEIVED) {
      if (this.state !== RECEIVED && !this.flushQueued) queueFlush(this);
    } else if (this.state === RECEIVED || (phase === IDLE && this.state === RESPONDING)) {
      this.write(phase);
    }
  }

  /** Writes RECEIVED if the phase still is. */
  flush() {
    if (!this.upgraded && this.state !== RECEIVED && this.phase() === RECEIVED) {
      this.write(RECEIVED);
    }
  }

  write(state) {
    if (this.closed) return;
    this.state = state;
    fs.writeSync(PROGRESS_FD, STATE_BYTES[state], 0, 1, this.slot);
  }

  /** A graceful stop: an idle connection closes now, a busy one after its last response. */
  stop() {
    if (this.phase() === IDLE) {
      this.socket.destroySoon();
    } else if (this.last !== null && !this.last.headersSent) {
      this.last.shouldKeepAlive = false;
    }
  }

  onClose() {
    if (this.closed) return;
    // The byte is left IDLE before the core may give the slot to another connection.
    if (this.state !== IDLE) this.write(IDLE);
    this.closed = true;
    shim.connections.delete(this);
    this.server._connections--;
    if (shim.config.accessLog) {
      // A response cut short by the connection's end never finished; an upgrade ends here.
      const last = this.last;
      if (last !== null && last[kBytes] !== undefined && last[kLogged] !== true) {
        logResponse(this, last);
      }
      if (this.upgrade !== null) logResponse(this, this.upgrade);
    }
    send({ cmd: 'APPMANAGER_CLOSED', seq: this.seq });
    if (shim.stopping && shim.connections.size === 0) finishStop();
  }
}

// Connections waiting for RECEIVED to be written; one flush serves all. A promise callback, as the
// cheapest deferral: setImmediate costs a tenth of a hello-world request, nextTick half that.
const flushQueue = [];
const resolved = Promise.resolve();

function queueFlush(conn) {
  conn.flushQueued = true;
  if (flushQueue.push(conn) === 1) resolved.then(flushProgress);
}

function flushProgress() {
  for (const conn of flushQueue) {
    conn.flushQueued = false;
    conn.flush();
  }
  flushQueue.length = 0;
}

/** At exit, from process.exit() in a request listener too: every waiting request on file. */
function flushAllProgress() {
  for (const conn of shim.connections) conn.flush();
}

function onSocketClose() {
  this[kConnection].onClose();
}

/** Every message from the core: the first is APPMANAGER_SPAWN, the later ones connections. */
function onMessage(message, socket) {
  if (!shim.spawning) {
    shim.spawning = true;
    spawn(message);
  } else if (message?.cmd === 'APPMANAGER_CONN') {
    acceptConnection(message, socket);
  }
}

/** Hands a connection from the core to the app's server, the bytes already read put back first. */
function acceptConnection(message, socket) {
  const { seq, slot } = message;
  if (!socket || !Number.isInteger(slot) || slot < 0) {
    const text = JSON.stringify(message).slice(0, 200);
    log(`connection ${seq}: protocol error: no descriptor or no valid slot in ${text}`);
    if (socket) socket.destroy();
    send({ cmd: 'APPMANAGER_CLOSED', seq });
    return;
  }
  if (shim.stopping || shim.server === null) {
    socket.destroy();
    send({ cmd: 'APPMANAGER_CLOSED', seq });
    return;
  }
  const server = shim.server;
  const data = typeof message.data === 'string' && message.data !== '' ? message.data : null;
  const conn = new Connection(seq, slot, socket, server, data !== null);
  socket[kConnection] = conn;
  shim.connections.add(conn);
  server._connections++;
  socket.on('close', onSocketClose);
  // A TCP descriptor knows its peer; a Unix socket's does not, and the core's fields stand in.
  if (socket.remoteAddress === undefined && typeof message.remote_addr === 'string') {
    Object.defineProperties(socket, {
      remoteAddress: { value: message.remote_addr },
      remotePort: { value: Number(message.remote_port) || 0 },
      remoteFamily: { value: net.isIPv6(message.remote_addr) ? 'IPv6' : 'IPv4' },
    });
  }
  // What Express (req.protocol, req.secure) and Koa read to learn that TLS carried the request.
  if (message.scheme === 'https') socket.encrypted = true;
  // Written at once: the first request is there already, and the slot may hold an old value.
  conn.write(data === null ? IDLE : RECEIVED);
  // The socket has read nothing yet: its reads start in the event loop's next poll, after this
  // tick, so these bytes are the first the HTTP parser sees.
  if (data !== null) socket.unshift(Buffer.from(data, 'base64'));
  server.emit('connection', socket);
}

// Errors inside the process

/** A request listener threw: a 500 when nothing was sent yet, else the connection must close. */
function requestFailed(err, req, res) {
  log(`error in request (${req.method} ${req.originalUrl ?? req.url}):\n${describeError(err)}`);
  if (res.writableEnded) return;
  if (res.headersSent) {
    // What was written goes out first (Node corks a response's writes until the next tick), then
    // the client sees the connection end mid-response.
    req.socket.destroySoon();
    return;
  }
  sendErrorPage(res, err);
}

function sendErrorPage(res, err) {
  const detail =
    shim.config.environment === 'development'
      ? `<pre>${escapeHtml(describeError(err))}</pre>`
      : '<p>The application failed to answer this request.</p>';
  const page = Buffer.from(
    '<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head>' +
      `<body><h1>Internal Server Error</h1>${detail}</body></html>\n`,
  );
  for (const name of res.getHeaderNames()) res.removeHeader(name);
  res.writeHead(500, {
    'Content-Type': 'text/html; charset=utf-8',
    'Content-Length': page.length,
  });
  res.end(page);
}

/**
 * An uncaught exception: Node's own state may be broken, so the process ends (status 1) and the
 * core starts a fresh one, as under Passenger or pm2. First each response that has not begun gets
 * a 500, and connections mid-response close. A connection whose request has arrived but has no
 * response to write on is left to the core, which answers it 502.
 *
 * An app that listens for 'uncaughtException' itself has chosen to live on; the shim lets it.
 */
function onUncaughtException(err) {
  if (!shim.answered) {
    failSpawn(err);
    return;
  }
  if (process.listenerCount('uncaughtException') > 1) return;
  log(`uncaught exception; the process exits:\n${describeError(err)}`);
  if (shim.crashing) process.exit(1);
  shim.crashing = true;
  let answering = 0;
  const answered = () => {
    if (--answering === 0) setImmediate(() => process.exit(1));
  };
  for (const conn of shim.connections) {
    const res = conn.socket._httpMessage;
    if (res && res[kConnection] === conn && !res.headersSent) {
      answering++;
      res.shouldKeepAlive = false;
      res.once('close', answered);
      try {
        sendErrorPage(res, err);
      } catch (pageErr) {
        log(`the 500 page failed too: ${describeError(pageErr)}`);
        conn.socket.destroy();
      }
    } else if (conn.phase() !== RECEIVED) {
      conn.socket.destroy();
    }
  }
  if (answering === 0) process.exit(1);
  setTimeout(() => process.exit(1), CRASH_GRACE_MS);
}

function describeError(err) {
  return err instanceof Error ? String(err.stack) : `thrown: ${String(err)}`;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// Stopping

/**
 * Stops taking connections; idle ones close now, busy ones after their responses; exits 0 when
 * none is left or when `graceMs` is over, whichever comes first. A second stop can only bring
 * the deadline closer.
 */
function stop(graceMs) {
  const deadline = Date.now() + graceMs;
  if (deadline < shim.stopDeadline) {
    shim.stopDeadline = deadline;
    clearTimeout(shim.stopTimer);
    shim.stopTimer = setTimeout(finishStop, graceMs);
  }
  if (shim.stopping) return;
  shim.stopping = true;
  for (const conn of shim.connections) conn.stop();
  if (shim.connections.size === 0) finishStop();
}

function finishStop() {
  try {
    shim.server?.emit('close');
  } finally {
    process.exit(0);
  }
}

/** The channel closed: the core is gone or wants this process gone (spawn.md). */
function onDisconnect() {
  if (!shim.answered) process.exit(1);
  stop(DISCONNECT_GRACE_MS);
}

function log(message) {
  process.stderr.write(`appmanager_node: ${message.trimEnd()}\n`);
}

async function spawn(message) {
  try {
    shim.config = spawnConfig(message);
    prepare(shim.config);
    shim.step = 'LOAD_APP';
    const exported = await loadApp(shim.config);
    shim.step = 'LISTEN';
    await findServer(exported);
  } catch (err) {
    failSpawn(err);
    return;
  }
  if (shim.answered) return; // the app failed asynchronously meanwhile
  shim.answered = true;
  process.removeListener('exit', onExitBeforeReady);
  send({ cmd: 'APPMANAGER_READY', pid: process.pid, concurrency: 0, protocol: PROTOCOL });
}

function main() {
  if (typeof process.send !== 'function') {
    log('no IPC channel on NODE_CHANNEL_FD; this file is run by appmanager');
    process.exit(2);
  }
  // The core handles Ctrl-C for the whole process group and stops us with EOF or TERM.
  process.on('SIGINT', () => {});
  process.on('uncaughtException', onUncaughtException);
  process.on('exit', onExitBeforeReady);
  // process.exit() in a request listener: what its request is waiting for must be on file.
  process.on('exit', flushAllProgress);
  process.on('disconnect', onDisconnect);
  // Also keeps the channel, and so the process, alive while the app loads and waits.
  process.on('message', onMessage);
}

main();
