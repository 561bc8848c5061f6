'use strict';
/**
 * An Express app for the Node shim's tests: JSON and form bodies, route parameters, streaming, a
 * 404, and errors through Express's error handler. Listens as Express apps do, with app.listen().
 */

const express = require('express');

const app = express();

app.get('/', (req, res) => {
  res.json({ hello: 'express', env: app.get('env'), pid: process.pid });
});

app.get('/info', (req, res) => {
  res.json({
    url: req.url,
    originalUrl: req.originalUrl,
    path: req.path,
    protocol: req.protocol,
    secure: req.secure,
    ip: req.ip ?? null,
    hostname: req.hostname,
  });
});

app.post('/json', express.json(), (req, res) => {
  res.status(201).json({ received: req.body });
});

app.post('/form', express.urlencoded({ extended: false }), (req, res) => {
  res.json({ received: req.body });
});

app.get('/users/:id', (req, res) => {
  res.json({ id: req.params.id, query: req.query });
});

app.get('/stream', (req, res) => {
  res.type('text/plain');
  let i = 0;
  const timer = setInterval(() => {
    res.write(`chunk ${i}\n`);
    if (++i === 3) {
      clearInterval(timer);
      res.end();
    }
  }, 5);
});

app.get('/error', (req, res, next) => {
  next(new Error('express error route'));
});

app.get('/throw', () => {
  throw new Error('express route threw');
});

app.use((err, req, res, next) => {
  res.status(500).json({ error: err.message });
});

app.listen(3000, () => {
  console.log('express app listening');
});
