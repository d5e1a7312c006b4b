// Drives forkd's E2B gateway with the unmodified E2B JS SDK
// (@e2b/code-interpreter). Run by forkd/tests/e2b.rs from the directory the
// SDK is installed in, with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set.
// Prints one line per check and "ALL OK" at the end.
import assert from 'node:assert/strict'
import { Sandbox } from '@e2b/code-interpreter'

const ok = (name) => console.log('ok', name)

const sb = await Sandbox.create({ metadata: { suite: 'e2b-js' } })
ok('create')
await sb.runCode('x = 41')
const out = []
const ex = await sb.runCode('print("hi"); x + 1', { onStdout: (m) => out.push(m.line) })
assert.equal(ex.text, '42')
assert.deepEqual(out, ['hi\n'])
ok('runCode with state and streaming')
const er = await sb.runCode('1/0')
assert.equal(er.error?.name, 'ZeroDivisionError')
assert.equal(er.error?.value, 'division by zero')
ok('error object')
await sb.files.write('/tmp/js/a.txt', 'from js')
assert.equal(await sb.files.read('/tmp/js/a.txt'), 'from js')
assert.deepEqual((await sb.files.list('/tmp/js')).map((e) => e.name), ['a.txt'])
ok('files')
const streamed = []
const r = await sb.commands.run('echo out; echo err >&2', { onStdout: (d) => streamed.push(d) })
assert.equal(r.exitCode, 0)
assert.equal(r.stdout, 'out\n')
assert.equal(r.stderr, 'err\n')
assert.equal(streamed.join(''), 'out\n')
ok('commands')
await assert.rejects(sb.commands.run('exit 4'), (e) => e.exitCode === 4)
ok('command exit code')
const ctx = await sb.createCodeContext()
assert.equal((await sb.runCode('2 + 2', { context: ctx })).text, '4')
ok('code context')
const events = []
const w = await sb.files.watchDir('/tmp/js', (e) => events.push(`${e.name}:${e.type}`))
await sb.files.write('/tmp/js/b.txt', 'w')
for (let i = 0; i < 40 && events.length === 0; i++) await new Promise((res) => setTimeout(res, 100))
await w.stop()
assert.deepEqual(events, ['b.txt:create'])
ok('watchDir stream')
const listed = (await Sandbox.list({ query: { metadata: { suite: 'e2b-js' } } }).nextItems()).map((s) => s.sandboxId)
assert.deepEqual(listed, [sb.sandboxId])
ok('list with metadata')
assert.equal((await sb.getInfo()).state, 'running')
await sb.kill()
assert.equal(await sb.isRunning(), false)
ok('kill')
await assert.rejects(Sandbox.create({ apiKey: 'wrong-key-wrong-key' }), (e) => e.constructor.name === 'AuthenticationError')
ok('wrong key refused')
console.log('ALL OK')
