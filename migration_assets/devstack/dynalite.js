// Runs dynalite on loopback. dynalite rethrows a request's socket errors, so a client killed
// mid-request (a SIGKILLed run) would take the server down with it; such errors are logged instead.
const dynalite = require('dynalite');

const [port, host] = [Number(process.argv[2]), process.argv[3] || '127.0.0.1'];
process.on('uncaughtException', (err) => {
  if (err && (err.code === 'ECONNRESET' || err.message === 'aborted')) {
    console.error(`a client went away mid-request: ${err.message}`);
    return;
  }
  console.error(err);
  process.exit(1);
});
dynalite({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 }).listen(port, host, () => {
  console.log(`Dynalite listening at: http://${host}:${port}`);
});
