// The stream player: one WebSocket to /stream, gapless playback with Web Audio
// (each chunk an AudioBuffer scheduled to start where the previous one ends), a
// scrolling spectrogram, and a "falling behind" indicator. The audio comes as Opus,
// decoded by WebCodecs' AudioDecoder (one decoder per encoder run), where the browser
// has it; else (or with ?format=pcm) as 16-bit PCM. Settings come from the URL
// query, as in Riffusion's web app: ?steps=50&alpha_step=0.25&seed_image=og_beat&denoising=0.75&seed=N
// (steps: the server's default, which its --max-steps bounds, unless given;
// &profile=realtime: expect the server's realtime profile, whose steps and scheduler it runs;
// &width=256: pixels per clip, 100 per second, 256 by default: shorter clips react sooner;
// a server whose export does not take it gets the seed image's width instead)
"use strict";

const query = new URLSearchParams(location.search);
const number = (name, fallback) => (query.has(name) ? Number(query.get(name)) : fallback);

const player = {
  // What a test (or a curious reader) can look at: window.riffusionPlayer.
  clips: 0, // clip events received
  samplesScheduled: 0,
  samplesPlayed: 0, // grows while the AudioContext plays what was scheduled
  underruns: 0, // chunks that arrived after the previous one had finished playing
  events: [], // the last clip events (without their images)
  reactions: [], // prompt_to_ear_s of each prompt: from sending it to hearing the music move
  errors: [],
  width: null, // the clip width the server runs (its ready event's)
  format: null, // the audio's format, as the ready event says: "opus" or "pcm_s16le"
  bytes: 0, // audio frames' bytes received
  audioSeconds: 0, // seconds of audio received (the frames' own, before decoding)
  chunks: [], // the last chunks scheduled: {index, count, first, last} (channel 0's first and last samples)
  state: "idle",
};
window.riffusionPlayer = player;

const el = (id) => document.getElementById(id);
const canvas = el("spectrogram");
const draw = canvas.getContext("2d");
let context = null; // AudioContext
let socket = null;
let sampleRate = 44100;
let channels = 1;
let bitrate = 0; // the audio's bits per second (the ready event's)
let nextTime = 0; // context time where the next chunk starts
let pending = null; // the clip event whose audio frame comes next
let segments = []; // {start, duration, index, image, told}
let seed = number("seed", Math.floor(Math.random() * 1e6));
let width = number("width", 256); // null once the server refused it: the seed image's width
let ready = false;
let format = "pcm_s16le"; // what this page asks for (sendStart): opus where WebCodecs decodes it
let run = null; // Opus: the current encoder run's decoder {decoder, skip, parts, have, time}
let waiting = []; // Opus: frames received, in order, waiting for their decoded samples

// Opus where this browser's WebCodecs decodes it, else PCM (and ?format=pcm asks for PCM).
const opusDecodes = (async () => {
  if (query.get("format") === "pcm" || !("AudioDecoder" in window)) return false;
  try {
    return (await AudioDecoder.isConfigSupported({ codec: "opus", sampleRate: 48000, numberOfChannels: 1 })).supported;
  } catch {
    return false;
  }
})();

function status(text) {
  el("status").textContent = text;
}

// Why a stream's socket closed, in words (the close codes of RFC 6455 the server uses).
function closed(close) {
  const reason = close.reason ? `: ${close.reason}` : "";
  const words = {
    1000: `the stream ended${reason}`,
    1001: "the server went away",
    1006: "the connection was lost, or the server could not be reached",
    1008: `the server closed the stream${reason}`,
    1011: `the server failed${reason}`,
    1012: "the server stopped or is restarting",
    1013: `the server is busy${reason}: try again later`,
  }[close.code] || `the stream closed${reason}`;
  return `${words} (${close.code}). Press Play to start again.`;
}

// Back to where Play starts a new stream, with the status saying why.
function finish(text) {
  if (socket) {
    socket.onclose = null;
    socket.onmessage = null;
    if (socket.readyState === WebSocket.CONNECTING || socket.readyState === WebSocket.OPEN) socket.close(1000);
  }
  for (const s of segments) s.source.stop();
  if (context) context.close();
  for (const r of new Set([run, ...waiting.map((f) => f.run)])) {
    if (r && r.decoder.state !== "closed") r.decoder.close();
  }
  run = null;
  waiting = [];
  socket = null;
  context = null;
  segments = [];
  pending = null;
  nextTime = 0;
  ready = false;
  player.state = "closed";
  behind(false);
  el("play").textContent = "Play";
  status(text);
}

function start() {
  // Opus decodes at 48 kHz, PCM comes at 44.1 kHz (the context plays either rate).
  const opus = query.get("format") !== "pcm" && "AudioDecoder" in window;
  context = new AudioContext({ sampleRate: opus ? 48000 : 44100 });
  player.state = "connecting";
  player.bytes = 0;
  player.audioSeconds = 0;
  player.chunks = [];
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${scheme}//${location.host}/stream`);
  socket.binaryType = "arraybuffer";
  const opened = socket;
  socket.onopen = async () => {
    format = (await opusDecodes) ? "opus" : "pcm_s16le";
    if (socket !== opened || opened.readyState !== WebSocket.OPEN) return; // closed meanwhile
    sendStart();
    player.state = "playing";
    status("waiting for the first clip...");
  };
  socket.onmessage = (message) => (typeof message.data === "string" ? onEvent(JSON.parse(message.data)) : onAudio(message.data));
  socket.onclose = (close) => finish(closed(close));
  requestAnimationFrame(frame);
}

function sendStart() {
  socket.send(JSON.stringify({
    type: "start",
    start: { prompt: el("prompt").value || "a jazz pianist playing a concerto", seed, denoising: number("denoising", 0.75) },
    seed_image_id: query.get("seed_image") || "og_beat",
    // the server's default steps unless the URL asks for some
    ...(query.has("steps") ? { num_inference_steps: number("steps", 50) } : {}),
    alpha_step: number("alpha_step", 0.25),
    // ?profile=realtime or default: the profile this page expects (the server runs one)
    ...(query.has("profile") ? { profile: query.get("profile") } : {}),
    ...(width !== null ? { width } : {}),
    format, // the server's --stream-opus-kbps, unless the URL gives ?bitrate= (bits per second)
    ...(format === "opus" && query.has("bitrate") ? { bitrate: number("bitrate", 104000) } : {}),
  }));
}

// A prompt as the events describe it: a prompt input, or a blend (where a steered walk
// started: two ends and an alpha).
function label(p) {
  return p.prompt !== undefined ? p.prompt : `${label(p.start)} / ${label(p.end)} at ${p.alpha}`;
}

function onEvent(event) {
  if (event.type === "ready") {
    ready = true;
    player.width = event.width;
    sampleRate = event.sample_rate;
    channels = event.channels;
    player.format = event.format;
    bitrate = event.bitrate;
    player.profile = event.profile;
    el("profile").textContent = `profile ${event.profile}: ${event.scheduler}, ${event.steps} steps, ` +
      (event.guidance > 1 ? `guidance ${event.guidance}` : "guidance off");
  } else if (event.type === "clip" || event.type === "tail") {
    pending = event;
    if (event.type === "clip") {
      player.clips += 1;
      status(`playing: ${player.clips} clips received`);
      const { image, ...rest } = event;
      player.events.push(rest);
      if (player.events.length > 50) player.events.shift();
      if (event.prompt_to_ear_s !== undefined) player.reactions.push(event.prompt_to_ear_s);
      el("now").textContent = `clip ${event.index}: ${label(event.start)} -> ${label(event.end)} (alpha ${event.alpha})` +
        `\nreal-time margin ${event.margin.toFixed(2)}x, ${event.ahead_s.toFixed(1)} s ahead` +
        (player.reactions.length ? `\nlast prompt heard ${player.reactions[player.reactions.length - 1].toFixed(1)} s after it was sent` : "");
      behind(event.behind);
    }
  } else if (event.type === "rewind") {
    rewind(event.after);
  } else if (event.type === "behind") {
    behind(true);
  } else if (event.type === "error" && !ready && event.field === "width" && width !== null) {
    width = null; // this server's export takes other widths: the seed image's, then
    sendStart();
  } else if (event.type === "error" && !ready) {
    // the stream was not started: the page's settings (its URL) were refused
    player.errors.push(event);
    finish(`the server refused to start the stream: ${event.field}: ${event.message}. ` +
      "Change the page's URL settings, then press Play.");
  } else if (event.type === "error") {
    player.errors.push(event);
    status(`refused: ${event.field}: ${event.message}`);
  } else if (event.type === "stopped") {
    status(`stopped: ${event.reason}`);
  }
}

// A steer dropped the clips after `after`: stop their sources (not yet playing) and play
// the next chunk right after clip `after`.
function rewind(after) {
  const kept = segments.filter((s) => s.index <= after);
  for (const s of segments) {
    if (s.index > after) {
      s.source.stop();
      player.samplesScheduled -= Math.round(s.duration * sampleRate);
    }
  }
  segments = kept;
  waiting = waiting.filter((f) => f.event.index <= after); // Opus: not yet decoded, not to be played
  player.chunks = player.chunks.filter((c) => c.index <= after);
  const last = kept[kept.length - 1];
  nextTime = last ? last.start + last.duration : 0;
  player.rewinds = (player.rewinds || 0) + 1;
}

function behind(on) {
  el("behind").classList.toggle("on", on);
}

function onAudio(data) {
  const event = pending;
  pending = null;
  // What a listener costs: the bytes received per second of the audio they carry, counted
  // as each frame arrives (before decoding; a rewind's dropped clips were received too).
  player.bytes += data.byteLength;
  player.audioSeconds += (format === "opus" ? event.decoded : data.byteLength / 2 / channels) / sampleRate;
  if (player.audioSeconds) {
    player.bytesPerSecond = player.bytes / player.audioSeconds;
    el("audio").textContent = `audio: ${player.format === "opus" ? `Opus at ${(bitrate / 1000).toFixed(0)} kbit/s` : "16-bit PCM"}, ` +
      `${(player.bytesPerSecond / 1000).toFixed(1)} kB received per second of audio`;
  }
  if (format === "opus") {
    decodeOpus(event, data);
    return;
  }
  const pcm = new Int16Array(data);
  const count = pcm.length / channels;
  const planes = [];
  for (let c = 0; c < channels; c++) {
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) out[i] = pcm[i * channels + c] / 32768;
    planes.push(out);
  }
  schedule(event, planes);
}

// An Opus frame: its packets (each a 16-bit little-endian length and the bytes) go to the
// run's decoder; its audio is scheduled, in order, once "decoded" samples have come out.
// A frame with pre_skip starts a new encoder run: a new decoder that drops that many samples
// (configured without an OpusHead, so that WebCodecs drops none itself).
function decodeOpus(event, data) {
  if (event.pre_skip !== undefined) {
    if (run && !waiting.some((f) => f.run === run)) run.decoder.close();
    const r = { skip: event.pre_skip, parts: [], have: 0, time: 0 };
    r.decoder = new AudioDecoder({
      output: (audio) => decoded(r, audio),
      error: (e) => finish(`the browser could not decode the stream's Opus: ${e.message}. Try ?format=pcm.`),
    });
    r.decoder.configure({ codec: "opus", sampleRate: 48000, numberOfChannels: channels });
    run = r;
  }
  waiting.push({ event, need: event.decoded, run });
  const view = new DataView(data);
  for (let at = 0; at < data.byteLength; ) {
    const size = view.getUint16(at, true);
    run.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: run.time, data: new Uint8Array(data, at + 2, size) }));
    run.time += 20000; // microseconds: 20 ms packets
    at += 2 + size;
  }
  drain();
}

function decoded(r, audio) {
  const n = audio.numberOfFrames;
  const skip = Math.min(r.skip, n);
  r.skip -= skip;
  if (skip < n) {
    const planes = [];
    for (let c = 0; c < channels; c++) {
      const plane = new Float32Array(n);
      audio.copyTo(plane, { planeIndex: c, format: "f32-planar" });
      planes.push(plane.subarray(skip));
    }
    r.parts.push(planes);
    r.have += n - skip;
  }
  audio.close();
  drain();
}

// Schedule the frames, in order, whose samples have been decoded.
function drain() {
  while (waiting.length && waiting[0].run.have >= waiting[0].need) {
    const { event, need, run: r } = waiting.shift();
    const planes = [];
    for (let c = 0; c < channels; c++) planes.push(new Float32Array(need));
    for (let got = 0; got < need; ) {
      const part = r.parts[0];
      const take = Math.min(part[0].length, need - got);
      for (let c = 0; c < channels; c++) planes[c].set(part[c].subarray(0, take), got);
      if (take === part[0].length) r.parts.shift();
      else r.parts[0] = part.map((p) => p.subarray(take));
      got += take;
    }
    r.have -= need;
    // a run before a rewind: closed once its kept frames are out
    if (r !== run && !waiting.some((f) => f.run === r) && r.decoder.state !== "closed") r.decoder.close();
    if (context) schedule(event, planes);
  }
}

// A chunk's samples (one Float32Array per channel) played right after the previous chunk.
function schedule(event, planes) {
  const count = planes[0].length;
  if (!count) return;
  player.chunks.push({ index: event ? event.index : -1, count, first: planes[0][0], last: planes[0][count - 1] });
  if (player.chunks.length > 200) player.chunks.shift();
  const buffer = context.createBuffer(channels, count, sampleRate);
  for (let c = 0; c < channels; c++) buffer.copyToChannel(planes[c], c);
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(context.destination);
  const now = context.currentTime;
  if (nextTime < now + 0.05) {
    if (segments.length) {
      player.underruns += 1; // the previous chunk ran out before this one came
      behind(true);
    }
    nextTime = now + 0.1;
  }
  source.start(nextTime);
  const segment = { start: nextTime, duration: buffer.duration, index: event ? event.index : -1, image: null, told: false, source };
  if (event && event.image) {
    const image = new Image();
    image.src = event.image;
    segment.image = image;
  }
  segments.push(segment);
  nextTime += buffer.duration;
  player.samplesScheduled += count;
}

function frame() {
  if (!context) return;
  const now = context.currentTime;
  let played = 0;
  for (const s of segments) {
    played += Math.max(0, Math.min(now - s.start, s.duration)) * sampleRate;
    if (!s.told && s.index >= 0 && now >= s.start && socket.readyState === WebSocket.OPEN) {
      s.told = true; // the server makes clips up to this one plus its buffer
      socket.send(JSON.stringify({ type: "played", clip: s.index }));
    }
  }
  player.samplesPlayed = Math.round(played);
  // The spectrogram scrolls right to left: now is the canvas' middle; 100 px per second.
  draw.fillStyle = "#000";
  draw.fillRect(0, 0, canvas.width, canvas.height);
  const middle = canvas.width / 2;
  for (const s of segments) {
    const x = middle + (s.start - now) * 100;
    if (s.image && s.image.complete && x < canvas.width && x + s.duration * 100 > 0) {
      draw.drawImage(s.image, x, 0, s.duration * 100, canvas.height);
    }
  }
  draw.fillStyle = "#ffffff80";
  draw.fillRect(middle, 0, 1, canvas.height);
  segments = segments.filter((s) => s.start + s.duration > now - 10);
  if (player.state !== "closed" && player.state !== "paused") requestAnimationFrame(frame);
}

el("play").addEventListener("click", async () => {
  if (!context) {
    start();
    el("play").textContent = "Pause";
  } else if (context.state === "running") {
    await context.suspend();
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "pause" }));
    player.state = "paused";
    status("paused");
    el("play").textContent = "Play";
  } else {
    await context.resume();
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resume" }));
    player.state = "playing";
    status("playing");
    el("play").textContent = "Pause";
    requestAnimationFrame(frame);
  }
});

el("controls").addEventListener("submit", (submit) => {
  submit.preventDefault();
  const prompt = el("prompt").value.trim();
  if (!prompt) {
    status("type a prompt first");
    return;
  }
  if (!socket) {
    // nothing is playing: start a stream from this prompt
    start();
    el("play").textContent = "Pause";
    return;
  }
  if (socket.readyState !== WebSocket.OPEN) {
    status("connecting: the prompt can be sent once the stream has started");
    return;
  }
  seed += 1;
  const when = el("when").value;
  socket.send(JSON.stringify({ type: "prompt", prompt: { prompt, seed, denoising: number("denoising", 0.75) }, when }));
  status(when === "wrap" ? `up next, at the wrap: ${prompt}` : `moving to: ${prompt}`);
});
