'use strict';
/**
 * Echoes the request as JSON: method, URL, headers, and the body's length and sha256.
 *
 * Paths starting with /app/ mirror tests/apps/wsgi_echo's: streaming, errors, crashes, sleeps.
 * A plain `http.createServer(...).listen(...)` app, as most Node apps start.
 */

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');

function echo(req, res) {
  const hash = crypto.createHash('sha256');
  let length = 0;
  req.on('data', (chunk) => {
    hash.update(chunk);
    length += chunk.length;
  });
  req.on('end', () => {
    const body = JSON.stringify({
      method: req.method,
      url: req.url,
      originalUrl: req.originalUrl ?? null,
      httpVersion: req.httpVersion,
      headers: req.headers,
      body: { length, sha256: hash.digest('hex') },
      remoteAddress: req.socket.remoteAddress ?? null,
      encrypted: Boolean(req.socket.encrypted),
      pid: process.pid,
      env: process.env.NODE_ENV ?? null,
      cwd: process.cwd(),
    });
    res.writeHead(200, {
      'Content-Type': 'application/json',
      'Content-Length': Buffer.byteLength(body),
    });
    res.end(body);
  });
}

// The answer every language's echo app gives at /conformance, for the shared suite. Node joins
// repeated headers with ", " itself (except Set-Cookie, which a request does not carry).
function conformance(req, res) {
  const hash = crypto.createHash('sha256');
  let length = 0;
  req.on('data', (chunk) => {
    hash.update(chunk);
    length += chunk.length;
  });
  req.on('end', () => {
    const [path, query = ''] = req.url.split(/\?(.*)/s);
    const body = JSON.stringify({
      method: req.method,
      path,
      query,
      headers: req.headers,
      body_len: length,
      body_sha256: hash.digest('hex'),
    });
    res.writeHead(200, {
      'Content-Type': 'application/json',
      'Content-Length': Buffer.byteLength(body),
    });
    res.end(body);
  });
}

function text(res, body, status = 200) {
  res.writeHead(status, {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

const routes = {
  '/app/stream': (req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    let i = 0;
    const next = () => {
      if (i === 3) {
        res.end();
        return;
      }
      res.write(`line ${i++}\n`);
      setImmediate(next);
    };
    next();
  },
  '/app/raise': () => {
    throw new Error('echo app raised on purpose');
  },
  '/app/raise-after-head': (req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.write('partial');
    throw new Error('echo app raised after the head');
  },
  '/app/async-raise': () => {
    setImmediate(() => {
      throw new Error('echo app raised asynchronously');
    });
  },
  '/app/crash': () => {
    process.exit(7);
  },
  '/app/sleep': (req, res, query) => {
    setTimeout(() => text(res, String(process.pid)), Number(query || '1') * 1000);
  },
  '/app/hold': (req, res) => {
    // Headers a moment later, the end of the body when /app/release is called.
    setTimeout(() => {
      res.writeHead(200, { 'Content-Type': 'text/plain' });
      res.write('held;');
      held.push(res);
    }, 20);
  },
  '/app/release': (req, res) => {
    for (const waiting of held.splice(0)) waiting.end('released');
    text(res, 'ok');
  },
  '/app/pid': (req, res) => text(res, String(process.pid)),
  '/app/print': (req, res) => {
    console.log("hello from the app's stdout");
    console.error('and its stderr');
    text(res, 'printed');
  },
  '/app/fds': (req, res) => {
    // The descriptors above stderr that a subprocess of the app would inherit: those without
    // O_CLOEXEC (octal 02000000 in /proc's flags).
    const inheritable = [];
    for (const fd of fs.readdirSync('/proc/self/fd')) {
      let flags;
      try {
        flags = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').match(/^flags:\s+(\d+)/m)[1];
      } catch {
        continue; // the listing's own descriptor, closed by now
      }
      if (Number(fd) > 2 && (parseInt(flags, 8) & 0o2000000) === 0) {
        inheritable.push({ fd: Number(fd), target: fs.readlinkSync(`/proc/self/fd/${fd}`) });
      }
    }
    text(res, JSON.stringify(inheritable));
  },
  '/app/status': (req, res, query) => {
    res.writeHead(Number(query || '204'));
    res.end();
  },
};
const held = [];

const server = http.createServer((req, res) => {
  const [path, query] = req.url.split('?', 2);
  const route = routes[path];
  if (path === '/conformance') {
    conformance(req, res);
  } else if (route === undefined) {
    echo(req, res);
  } else {
    route(req, res, query);
  }
});

server.listen(process.env.PORT || 3000, () => {
  console.log(`echo app listening on ${JSON.stringify(server.address())}`);
});
