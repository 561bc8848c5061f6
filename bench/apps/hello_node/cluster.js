// The bare baseline for bench/node_hello.py: Node's cluster module forks WORKERS (default 2)
// workers that each run app.js; they share the listening socket on PORT (default 3000), so the
// primary never touches a request. SIGTERM or SIGINT stops the workers, then the primary.
'use strict';
const cluster = require('cluster');
const path = require('path');

if (cluster.isPrimary) {
  const workers = Number(process.env.WORKERS || 2);
  let stopping = false;
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (!stopping) {
      console.error(`worker ${worker.process.pid} exited (${signal || code}); stopping`);
      stop();
    }
  });
  const stop = () => {
    stopping = true;
    for (const worker of Object.values(cluster.workers)) worker.kill('SIGTERM');
    const exitWhenDone = () => {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
      else setTimeout(exitWhenDone, 50);
    };
    exitWhenDone();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  require(path.join(__dirname, 'app.js'));
}
