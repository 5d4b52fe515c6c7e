// The KServe v2 / Triton gRPC API of a real pipeserve server, called from Node's @grpc/grpc-js
// with stubs that @grpc/proto-loader builds from proto/ (no code shared with grpc C-core).
//
//   node grpc_js_kserve.js PORT PROTO_DIR
//
// Uses the add_sub model of tests/e2e/conftest.py (OUTPUT0 = INPUT0 + INPUT1, FP32 [1,16]) and
// the slow model of tests/e2e/lifecycle.py (x FP32 [1,64], milliseconds per request).
// Prints one JSON object: {case name: {ok, ...what was seen}}.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [port, protoDir] = process.argv.slice(2);
const definition = loader.loadSync(path.join(protoDir, "grpc_service.proto"), {
  keepCase: true,
  longs: String,
  defaults: true,
  includeDirs: [protoDir],
});
const inference = grpc.loadPackageDefinition(definition).inference;

function floats(values) {
  return Buffer.from(new Float32Array(values).buffer);
}

function request(id, a, b) {
  const input = (name) => ({ name, datatype: "FP32", shape: ["1", "16"] });
  return {
    model_name: "add_sub",
    id,
    inputs: [input("INPUT0"), input("INPUT1")],
    outputs: [{ name: "OUTPUT0" }],
    raw_input_contents: [floats(a), floats(b)],
  };
}

function sumOk(response, a, b) {
  const raw = response.raw_output_contents[0];
  const got = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length));
  return got.length === 16 && got.every((v, i) => v === a[i] + b[i]);
}

const call = (fn, req, options = {}) =>
  new Promise((resolve) => fn(req, new grpc.Metadata(), options, (err, res) =>
    resolve(err ? { code: err.code, details: err.details } : { res })));

async function main() {
  const client = new inference.GRPCInferenceService(`127.0.0.1:${port}`,
    grpc.credentials.createInsecure());
  const c = (name) => client[name].bind(client);
  const out = {};
  const a = Array.from({ length: 16 }, (_, i) => i);
  const b = Array.from({ length: 16 }, (_, i) => 100 * i);

  const live = await call(c("ServerLive"), {});
  out.server_live = { ok: live.res?.live === true };

  const meta = await call(c("ModelMetadata"), { name: "add_sub" });
  out.model_metadata = {
    ok: meta.res?.inputs.map((t) => t.name).join() === "INPUT0,INPUT1",
    inputs: meta.res?.inputs.map((t) => t.name),
  };

  const infer = await call(c("ModelInfer"), request("one", a, b), { deadline: Date.now() + 10000 });
  out.model_infer = { ok: infer.res !== undefined && infer.res.id === "one" && sumOk(infer.res, a, b) };

  const many = await Promise.all(Array.from({ length: 64 }, (_, i) =>
    call(c("ModelInfer"), request(`c${i}`, a.map((v) => v + i), b))));
  out.model_infer_64_concurrent = {
    ok: many.every((r, i) => r.res?.id === `c${i}` && sumOk(r.res, a.map((v) => v + i), b)),
  };

  const missing = await call(c("ModelInfer"), { ...request("x", a, b), model_name: "nope" });
  out.unknown_model = {
    ok: missing.code === grpc.status.NOT_FOUND && /unknown model/.test(missing.details),
    details: missing.details,
  };

  // Streaming: 10 requests on one ModelStreamInfer stream, answered in order.
  const stream = client.ModelStreamInfer();
  const answers = [];
  const done = new Promise((resolve) => {
    stream.on("data", (m) => answers.push(m));
    stream.on("error", (err) => resolve(err.code));
    stream.on("end", () => resolve(0));
  });
  for (let i = 0; i < 10; i++) stream.write(request(`s${i}`, a, b.map((v) => v + i)));
  stream.end();
  const code = await done;
  out.stream_infer = {
    ok: code === 0 && answers.length === 10 && answers.every((m, i) =>
      m.error_message === "" && m.infer_response.id === `s${i}` &&
      sumOk(m.infer_response, a, b.map((v) => v + i))),
    answers: answers.length,
  };

  // Cancelling a stream mid-way leaves the server serving.
  const cancelled = client.ModelStreamInfer();
  const first = new Promise((resolve) => cancelled.once("data", resolve));
  const cancelEnd = new Promise((resolve) => cancelled.on("error", (err) => resolve(err.code)));
  cancelled.write(request("c", a, b));
  await first;
  cancelled.cancel();
  out.stream_cancel = { ok: (await cancelEnd) === grpc.status.CANCELLED };

  // A deadline that expires while the server computes is DEADLINE_EXCEEDED; the next call is
  // answered as usual.
  const slow = {
    model_name: "slow",
    id: "late",
    inputs: [{ name: "x", datatype: "FP32", shape: ["1", "64"] }],
    raw_input_contents: [floats(new Array(64).fill(0.5))],
  };
  const late = await call(c("ModelInfer"), slow, { deadline: Date.now() + 1 });
  const after = await call(c("ModelInfer"), request("after", a, b));
  out.deadline = {
    ok: late.code === grpc.status.DEADLINE_EXCEEDED && after.res?.id === "after",
    code: late.code,
  };

  client.close();
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`grpc-js client failed: ${err.stack}\n`);
  process.exit(2);
});
