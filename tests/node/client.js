#!/usr/bin/env node
// A gRPC client for the llmfabric edge written against nothing but the repo's
// .proto files, to prove the public API works from another language.
//
//   node client.js HOST:PORT stream|unary|models|bad
//
// Prints exactly one JSON line on stdout:
//   stream, unary  {"ok":true,"text":...,"chunks":N,"finish_reason":...,"usage":{...},...}
//   models         {"ok":true,"models":[{"name":...,"context_length":...,"owned_by":...}]}
//   bad            {"ok":false,"code":<grpc status number>,"details":...}
// A gRPC error in any mode but `bad` (or a success in `bad`) still prints its
// JSON line, plus a message on stderr, and exits 1; usage errors exit 2.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The repo's protos/ directory: llmfabric/** plus the vendored google/api/*.
// google/protobuf/descriptor.proto (imported by google/api/annotations.proto)
// is not in it: proto-loader registers protobufjs's bundled copy of the
// well-known types, so the import resolves without any file on disk.
const PROTO_ROOT = path.resolve(__dirname, '../../protos');
const PROTO_FILE = 'llmfabric/inference/v1/inference.proto';
const DEADLINE_MS = 60 * 1000;

const LOADER_OPTIONS = {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the .proto (max_tokens, finish_reason)
  longs: String, // uint64 seed / int64 retry_after_ms as decimal strings
  enums: String, // FINISH_REASON_STOP, not 1
  defaults: true, // unset scalars appear with their zero value
  oneofs: true, // proto3 `optional` fields are synthetic oneofs
};

const MESSAGES = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Say hello.' },
];
const OPTIONS = { sampling: { max_tokens: 16, temperature: 0 } };

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
  const pkg = grpc.loadPackageDefinition(definition);
  const Service = pkg.llmfabric.inference.v1.InferenceService;
  if (typeof Service !== 'function') {
    throw new Error('llmfabric.inference.v1.InferenceService not found in ' + PROTO_FILE);
  }
  return Service;
}

function deadline() {
  return { deadline: Date.now() + DEADLINE_MS };
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function statusName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

function errorResult(err) {
  return { ok: false, code: err.code, details: err.details, status: statusName(err.code) };
}

// Runs one mode; resolves to { result, ok } where ok says whether the outcome
// was the one this mode expects.
function run(client, mode) {
  switch (mode) {
    case 'stream':
      return chatStream(client, MESSAGES).then(
        (result) => ({ result, ok: true }),
        (err) => ({ result: errorResult(err), ok: false, err }),
      );
    case 'unary':
      return chat(client).then(
        (result) => ({ result, ok: true }),
        (err) => ({ result: errorResult(err), ok: false, err }),
      );
    case 'models':
      return listModels(client).then(
        (result) => ({ result, ok: true }),
        (err) => ({ result: errorResult(err), ok: false, err }),
      );
    case 'bad':
      return chatStream(client, []).then(
        (result) => ({ result, ok: false, err: new Error('ChatStream with no messages succeeded') }),
        (err) => ({ result: errorResult(err), ok: err.code !== undefined, err }),
      );
    default:
      return Promise.reject(new UsageError('unknown mode ' + JSON.stringify(mode)));
  }
}

function chatStream(client, messages) {
  return new Promise((resolve, reject) => {
    const call = client.ChatStream({ messages, options: OPTIONS }, deadline());
    const deltas = [];
    let chunks = 0;
    let finishReason = 'FINISH_REASON_UNSPECIFIED';
    let usage = null;
    let model = '';
    let requestId = '';
    let streamError = null;
    call.on('data', (msg) => {
      chunks += 1;
      deltas.push(msg.delta);
      if (msg.finish_reason && msg.finish_reason !== 'FINISH_REASON_UNSPECIFIED') {
        finishReason = msg.finish_reason;
      }
      if (msg.usage) usage = msg.usage;
      if (msg.model) model = msg.model;
      if (msg.request_id) requestId = msg.request_id;
      if (msg.error && msg.error.code) streamError = msg.error;
    });
    call.on('error', reject);
    call.on('end', () => {
      const result = {
        ok: true,
        text: deltas.join(''),
        chunks,
        finish_reason: finishReason,
        usage,
        model,
        request_id: requestId,
      };
      if (streamError) {
        result.ok = false;
        result.error = streamError;
      }
      resolve(result);
    });
  });
}

function chat(client) {
  return new Promise((resolve, reject) => {
    client.Chat({ messages: MESSAGES, options: OPTIONS }, deadline(), (err, resp) => {
      if (err) return reject(err);
      resolve({
        ok: true,
        text: resp.message ? resp.message.content : '',
        chunks: 1,
        finish_reason: resp.finish_reason,
        usage: resp.usage,
        model: resp.model,
        request_id: resp.request_id,
        role: resp.message ? resp.message.role : '',
      });
    });
  });
}

function listModels(client) {
  return new Promise((resolve, reject) => {
    client.ListModels({}, deadline(), (err, resp) => {
      if (err) return reject(err);
      resolve({ ok: true, models: resp.models });
    });
  });
}

class UsageError extends Error {}

async function main() {
  const [address, mode] = process.argv.slice(2);
  if (!address || !mode) {
    throw new UsageError('usage: node client.js HOST:PORT stream|unary|models|bad');
  }
  const Service = loadService();
  // The edge wants an API key: `authorization: Bearer <key>` on every call.
  const key = process.env.LLMFABRIC_API_KEY || '';
  const auth = (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      if (key) metadata.set('authorization', `Bearer ${key}`);
      next(metadata, listener);
    },
  });
  const client = new Service(address, grpc.credentials.createInsecure(), { interceptors: [auth] });
  try {
    const { result, ok, err } = await run(client, mode);
    emit(result);
    if (!ok || (mode !== 'bad' && result.ok === false)) {
      const why = err ? err.message : 'stream ended with an error: ' + JSON.stringify(result.error);
      process.stderr.write(`client.js ${mode}: unexpected outcome: ${why}\n`);
      process.exitCode = 1;
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  if (err instanceof UsageError) {
    process.stderr.write(`client.js: ${err.message}\n`);
    process.exitCode = 2;
  } else {
    process.stderr.write(`client.js: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 1;
  }
});
