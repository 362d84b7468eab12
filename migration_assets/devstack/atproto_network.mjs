// A local AT Protocol network for tests, benches and the demo: one PLC directory (in memory) and N
// reference PDSes (SQLite + disk blobstore under a data dir), no appview, bound to 127.0.0.1.
// Built like @atproto/dev-env's TestPlc/TestPds, but from @atproto/pds and @did-plc/server directly:
// dev-env's index also loads the bsky appview, whose undici v8 does not load on Node 20.
//
// Usage: node atproto_network.mjs [--pds-count N] [--blob-upload-limit BYTES]
//          [--max-import-size BYTES] [--data-dir DIR] [--plc-port P] [--pds-ports P1,P2,...]
//          [--plc-url URL]   (PDSes only, against that PLC; --pds-count 0 starts a PLC alone)
// Each flag falls back to env ATPROTO_DEV_<FLAG> (e.g. ATPROTO_DEV_PDS_COUNT).
// When ready, prints ONE JSON line on stdout: {"plc": url, "pdses": [{"url", "did", "admin_password"}]}.
// Runs until SIGTERM/SIGINT or until stdin closes (the parent went away), then shuts down cleanly.
import { randomBytes } from 'node:crypto'
import { mkdtemp, mkdir, rm } from 'node:fs/promises'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { parseArgs } from 'node:util'
import workerThreads from 'node:worker_threads'
import zlib from 'node:zlib'

// @atproto/pds 0.5 declares Node >= 22; its undici 8 touches two Node 22 APIs while loading.
// Neither matters on loopback, so stand-ins let it run on Node 20: no zstd bodies are ever sent
// here, and marking objects uncloneable only guards structuredClone.
if (typeof zlib.createZstdDecompress !== 'function') {
  zlib.createZstdDecompress = () => {
    throw new Error(`zstd decompression needs Node >= 22.19 (running ${process.version})`)
  }
}
if (typeof workerThreads.markAsUncloneable !== 'function') {
  workerThreads.markAsUncloneable = () => {}
}
if (typeof Iterator === 'undefined' || typeof Iterator.prototype.filter !== 'function') {
  // ES2025 built-ins (iterator helpers, Set methods, ...) that Node 22 has natively; core-js is
  // already a dependency of @atproto/lex-data.
  await import('core-js/actual/index.js')
}
const { Secp256k1Keypair } = await import('@atproto/crypto')
const { PDS } = await import('@atproto/pds')
const plc = await import('@did-plc/server')

const LOOPBACK = '127.0.0.1'
const MB = 1024 * 1024

// The PDS and PLC servers call listen(port) which binds every interface; keep them on loopback.
const originalListen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, LOOPBACK)
  }
  return originalListen.apply(this, args)
}

function readOptions() {
  const flags = ['pds-count', 'blob-upload-limit', 'max-import-size', 'data-dir', 'plc-port', 'plc-url', 'pds-ports']
  const { values } = parseArgs({
    options: Object.fromEntries(flags.map((f) => [f, { type: 'string' }])),
  })
  const get = (flag) => values[flag] ?? process.env[`ATPROTO_DEV_${flag.toUpperCase().replaceAll('-', '_')}`]
  const int = (flag, fallback) => {
    const raw = get(flag)
    if (raw === undefined || raw === '') return fallback
    const n = Number(raw)
    if (!Number.isInteger(n) || n < 0) throw new Error(`--${flag} must be a non-negative integer, got ${raw}`)
    return n
  }
  const pdsCount = int('pds-count', 2)
  const plcUrl = get('plc-url')
  if (pdsCount < 1 && plcUrl) throw new Error('--pds-count 0 starts a PLC alone; it cannot be given --plc-url')
  const blobUploadLimit = int('blob-upload-limit', 5 * MB)
  const pdsPorts = (get('pds-ports') ?? '').split(',').filter(Boolean).map(Number)
  if (pdsPorts.length > 0 && pdsPorts.length !== pdsCount) {
    throw new Error(`--pds-ports lists ${pdsPorts.length} ports for ${pdsCount} PDSes`)
  }
  return {
    pdsCount,
    blobUploadLimit,
    // importRepo bodies are capped separately; a migrated 10k-record repo is a few MB.
    maxImportSize: int('max-import-size', Math.max(blobUploadLimit, 100 * MB)),
    dataDir: get('data-dir'),
    plcPort: int('plc-port', 0),
    plcUrl,
    pdsPorts,
  }
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = originalListen.call(net.createServer(), 0, LOOPBACK, () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
    server.on('error', reject)
  })
}

async function startPlc(port) {
  const server = plc.PlcServer.create({ db: plc.Database.mock(), port })
  await server.start()
  // "localhost", as dev-env does: the PDS identity fetcher fails on IP-literal hosts (ENOTFOUND).
  return { url: `http://localhost:${port}`, close: () => server.destroy() }
}

async function startPds(index, opts, plcUrl, root) {
  const port = opts.pdsPorts[index] || (await freePort())
  const dir = path.join(root, `pds${index}`)
  await mkdir(dir, { recursive: true })
  const adminPassword = randomBytes(18).toString('base64url')
  const rotationKey = await Secp256k1Keypair.create({ exportable: true })
  const pds = await PDS.fromEnv({
    devMode: true,
    port,
    hostname: 'localhost', // public URL http://localhost:<port>, as in DID documents
    // Distinct service DIDs so service-auth audiences tell the PDSes apart during migration.
    serviceDid: `did:web:localhost%3A${port}`,
    didPlcUrl: plcUrl,
    dataDirectory: dir,
    blobstoreDiskLocation: path.join(dir, 'blobs'),
    blobUploadLimit: opts.blobUploadLimit,
    maxImportSize: opts.maxImportSize,
    adminPassword,
    jwtSecret: randomBytes(18).toString('base64url'),
    plcRotationKeyK256PrivateKeyHex: Buffer.from(await rotationKey.export()).toString('hex'),
    recoveryDidKey: (await Secp256k1Keypair.create()).did(),
    inviteRequired: false,
    rateLimitsEnabled: false,
    disableSsrfProtection: true,
    serviceHandleDomains: ['.test'],
    bskyAppViewUrl: 'https://appview.invalid',
    bskyAppViewDid: 'did:example:invalid',
    modServiceUrl: 'https://moderator.invalid',
    modServiceDid: 'did:example:invalid',
    crawlers: [],
  })
  await pds.start()
  const info = { url: `http://localhost:${port}`, did: pds.ctx.cfg.service.did, admin_password: adminPassword }
  return { close: () => pds.destroy(), info }
}

async function main() {
  const opts = readOptions()
  const ownsDataDir = !opts.dataDir
  const root = opts.dataDir ?? (await mkdtemp(path.join(os.tmpdir(), 'atproto-network-')))
  const running = { plc: null, pdses: [] }
  let stopping = null

  const stop = (reason, exitCode = 0) => {
    stopping ??= (async () => {
      console.error(`atproto network: stopping (${reason})`)
      const results = await Promise.allSettled(running.pdses.map((p) => p.close()))
      if (running.plc) results.push(...(await Promise.allSettled([running.plc.close()])))
      if (ownsDataDir) await rm(root, { recursive: true, force: true })
      const failed = results.filter((r) => r.status === 'rejected')
      failed.forEach((r) => console.error('atproto network: close failed', r.reason))
      process.exit(failed.length ? 1 : exitCode)
    })()
    return stopping
  }
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
  process.stdin.on('end', () => stop('stdin closed'))
  process.stdin.on('error', () => stop('stdin error'))
  process.stdin.resume()

  try {
    // --plc-url: PDSes only, against a PLC running elsewhere (its own process, as in production)
    if (!opts.plcUrl) running.plc = await startPlc(opts.plcPort || (await freePort()))
    const plcUrl = opts.plcUrl ?? running.plc.url
    const infos = []
    for (let i = 0; i < opts.pdsCount; i++) {
      const { close, info } = await startPds(i, opts, plcUrl, root)
      running.pdses.push({ close })
      infos.push(info)
    }
    if (stopping) return
    process.stdout.write(JSON.stringify({ plc: plcUrl, pdses: infos, data_dir: root }) + '\n')
  } catch (err) {
    console.error('atproto network: failed to start:', err)
    await stop('start failure', 1)
  }
}

main()
