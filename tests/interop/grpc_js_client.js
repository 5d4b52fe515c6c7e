// Interop cases run by Node's @grpc/grpc-js (an HTTP/2 and gRPC implementation that shares no
// code with grpc C-core) against the test.Echo service of tests/unit/h2_driver.py.
//
//   node grpc_js_client.js PORT
//
// Prints one JSON object: {case name: {ok, ...what was seen}}; exits 0 once every case ran.
// The Python side (test_grpc_js.py) asserts on what was seen, and on the server side.
"use strict";

const grpc = require("@grpc/grpc-js");

const port = process.argv[2];
const same = (b) => b; // messages are raw bytes both ways
const path = (m) => `/test.Echo/${m}`;

function client(options = {}) {
  return new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 64 << 20,
    "grpc.max_send_message_length": 64 << 20,
    ...options,
  });
}

function unary(c, method, payload, options = {}) {
  return new Promise((resolve) => {
    c.makeUnaryRequest(path(method), same, same, Buffer.from(payload), new grpc.Metadata(),
      options, (err, res) => resolve(err ? { code: err.code, details: err.details } : { res }));
  });
}

function ended(call, out) {
  return new Promise((resolve) => {
    call.on("data", (m) => out.push(m));
    call.on("error", (err) => resolve({ code: err.code, details: err.details }));
    call.on("end", () => resolve({ code: 0 }));
  });
}

const deadline = (ms) => new Date(Date.now() + ms);

async function main() {
  const c = client();
  const out = {};

  const small = await unary(c, "Echo", "hello grpc-js");
  out.unary = { ok: small.res?.toString() === "hello grpc-js" };

  const big = Buffer.alloc(5 << 20, 7); // more than the default windows: flow control both ways
  const echoed = await unary(c, "Echo", big);
  out.unary_5mib = { ok: echoed.res?.equals(big) === true, bytes: echoed.res?.length };

  const many = await Promise.all(
    Array.from({ length: 200 }, (_, i) => unary(c, "Echo", `call ${i}`)));
  out.concurrent_200 = { ok: many.every((r, i) => r.res?.toString() === `call ${i}`) };

  const repeated = [];
  const repeat = c.makeServerStreamRequest(path("Repeat"), same, same, Buffer.from("100"));
  const repeatEnd = await ended(repeat, repeated);
  out.server_streaming = {
    ok: repeatEnd.code === 0 && repeated.map(String).join(",") ===
      Array.from({ length: 100 }, (_, i) => String(i)).join(","),
    messages: repeated.length,
  };

  const sum = await new Promise((resolve) => {
    const call = c.makeClientStreamRequest(path("Sum"), same, same, (err, res) =>
      resolve(err ? { code: err.code } : { res: res.toString() }));
    for (let i = 0; i < 50; i++) call.write(Buffer.alloc(1000, i));
    call.end();
  });
  out.client_streaming = { ok: sum.res === "50000", got: sum.res ?? sum.code };

  const bidi = c.makeBidiStreamRequest(path("Stream"), same, same);
  const echoes = [];
  const bidiEnd = ended(bidi, echoes);
  const sent = Array.from({ length: 20 }, (_, i) => `message ${i}`);
  for (const m of sent) bidi.write(Buffer.from(m));
  bidi.end();
  const bidiStatus = await bidiEnd;
  out.bidi_streaming = { ok: bidiStatus.code === 0 && echoes.map(String).join() === sent.join() };

  // The deadline travels as grpc-timeout; the server cancels the handler and answers.
  const started = Date.now();
  const late = await unary(c, "Wait", "", { deadline: deadline(300) });
  out.deadline = {
    ok: late.code === grpc.status.DEADLINE_EXCEEDED,
    code: late.code,
    ms: Date.now() - started,
  };

  // Cancellation: RST_STREAM from the client; the server cancels the handler (checked there).
  const cancelled = await new Promise((resolve) => {
    const call = c.makeUnaryRequest(path("Wait"), same, same, Buffer.alloc(0), (err) =>
      resolve({ code: err?.code }));
    setTimeout(() => call.cancel(), 1000); // long after the request reached the server
  });
  out.cancel = { ok: cancelled.code === grpc.status.CANCELLED, code: cancelled.code };

  const stream = c.makeBidiStreamRequest(path("Stream"), same, same);
  const got = [];
  const streamEnd = ended(stream, got);
  const firstEcho = new Promise((resolve) => stream.once("data", resolve));
  stream.write(Buffer.from("first"));
  await firstEcho; // the stream is open at both ends: cancel it mid-way
  stream.cancel();
  const streamStatus = await streamEnd;
  out.cancel_stream = {
    ok: streamStatus.code === grpc.status.CANCELLED && got.map(String).join() === "first",
    code: streamStatus.code,
  };

  const failed = await unary(c, "Abort", "");
  out.error_status = {
    ok: failed.code === grpc.status.NOT_FOUND && failed.details === "no such thing: ünïcode 100%",
    details: failed.details,
  };

  const missing = await unary(c, "Nope", "");
  out.unimplemented = { ok: missing.code === grpc.status.UNIMPLEMENTED, code: missing.code };

  // 2 = gzip in grpc-js's compression algorithm enum.
  const zipped = client({ "grpc.default_compression_algorithm": 2 });
  const text = "compress me ".repeat(10000);
  const unzipped = await unary(zipped, "Echo", text);
  out.gzip_request = { ok: unzipped.res?.toString() === text };
  zipped.close();

  const after = await unary(c, "Echo", "still serving");
  out.after_all = { ok: after.res?.toString() === "still serving" };

  c.close();
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`grpc-js client failed: ${err.stack}\n`);
  process.exit(2);
});
