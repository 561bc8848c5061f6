// Hello world on Node's http module (no framework): what bench/node_hello.py serves.
require('http').createServer((req, res) => { res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': 14}); res.end('Hello, world!\n'); }).listen(process.env.PORT || 3000)
