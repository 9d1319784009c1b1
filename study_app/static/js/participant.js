/* The participant page: consent → instructions → practice → trials → completion.
 *
 * Talks to the participant JSON API (docs/study_api.md). Every answer goes into an
 * outbox kept in localStorage and is sent in answer order, each until the server
 * acknowledges it (same trial token, so the server stores it once), after a network
 * failure, a server error or a reload. Sending runs beside the trials: offline, the
 * participant goes on through every trial already fetched (their images are preloaded)
 * while the notice counts the answers waiting to be sent.
 * State is mirrored on <body data-state="..."> for styling and for the browser tests.
 */
(function () {
  "use strict";

  const core = window.PStudyCore;
  const display = window.PStudyDisplay; // the display step before the trials (calibration.js)
  const root = document.getElementById("participant-app");
  // Every text this script shows, in the study's language (study_app/i18n.py).
  const TEXT = JSON.parse(root.dataset.texts);
  const t = (key, values) => (TEXT[key] || key).replace(
    /%\((\w+)\)s/g, (match, name) => String(values && name in values ? values[name] : match));
  const slug = root.dataset.study;
  const apiBase = root.dataset.api; // e.g. "/api/v1"
  const preview = root.dataset.preview === "true";
  const storage = safeStorage(preview ? "sessionStorage" : "localStorage");
  const storeKey = (name) => "pstudy." + slug + "." + (preview ? "preview." : "") + name;

  /** Web storage, or an in-memory stand-in where the browser refuses it (private mode):
   * the study still runs, only resuming after a reload is lost. */
  function safeStorage(name) {
    try {
      const store = window[name];
      store.setItem("pstudy.probe", "1");
      store.removeItem("pstudy.probe");
      return store;
    } catch (error) {
      const memory = new Map();
      return {
        getItem: (key) => (memory.has(key) ? memory.get(key) : null),
        setItem: (key, value) => memory.set(key, String(value)),
        removeItem: (key) => memory.delete(key),
      };
    }
  }

  const RETRY_BASE_MS = 500;
  const RETRY_MAX_MS = 8000;
  const POLL_MS = 5000;
  const PRELOAD_AHEAD = 3;
  const REDIRECT_DELAY_MS = 3000;

  const $ = (id) => document.getElementById(id);
  const screens = ["loading", "refused", "consent", "declined", "instructions", "main-start", "break", "trial", "waiting", "done", "failed", "withdrawn", ...display.screens];
  // Touch-first where the main pointer is a finger: tap hints, no keyboard hints.
  const touch = window.matchMedia("(pointer: coarse)").matches;
  document.body.classList.toggle("touch", touch);

  let study = null;
  let participant = null; // {id, token, status, progress: {answered, total}}
  let queue = []; // trials not yet shown: {token, reference_url, left_url, right_url}
  const answered = new Set(); // trial tokens whose vote the server acknowledged
  const seen = new Set(); // trial tokens already put on screen
  let progress = { answered: 0, total: 0 };
  let active = null; // the trial on screen: {trial, practice, presentedPerf, answer}
  let offline = false;
  let framePeriod = null; // Promise<number>: the display's frame period (ms), if exposure is limited
  const preloaded = new Map(); // url -> Promise<HTMLImageElement>

  // ------------------------------------------------------------------ screens

  function show(name) {
    screens.forEach((screen) => {
      const el = $("screen-" + screen);
      if (el) el.hidden = screen !== name;
    });
    document.body.dataset.state = name;
  }

  function fail(message) {
    $("failed-message").textContent = message;
    show("failed");
  }

  function setNotice(text, ok) {
    const notice = $("connection-notice");
    if (!text) {
      notice.hidden = true;
      return;
    }
    notice.textContent = text;
    notice.classList.toggle("ok", Boolean(ok));
    notice.hidden = false;
  }

  function setProgress(answeredCount, total, label) {
    const fraction = total > 0 ? Math.min(1, answeredCount / total) : 0;
    const bar = $("progress");
    bar.setAttribute("aria-valuenow", String(answeredCount));
    bar.setAttribute("aria-valuemax", String(total));
    $("progress-fill").style.width = (fraction * 100).toFixed(1) + "%";
    $("progress-label").textContent = label || answeredCount + " / " + total;
  }

  // ------------------------------------------------------------------ network

  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.error) || "HTTP " + status);
      this.status = status;
      this.body = body || {};
    }
  }

  async function request(method, path, body, token) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers.Authorization = "Bearer " + token;
    let response;
    try {
      response = await fetch(apiBase + path, {
        method: method,
        headers: headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin",
        cache: "no-store",
      });
    } catch (networkError) {
      throw new HttpError(0, { error: "network error: " + networkError.message });
    }
    let data = null;
    try {
      data = await response.json();
    } catch (parseError) {
      data = null;
    }
    if (!response.ok) {
      const error = new HttpError(response.status, data);
      error.retryAfterS = parseFloat(response.headers.get("Retry-After") || "0") || 0;
      throw error;
    }
    return data;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** Run `call` until it succeeds or fails with a non-retryable error (thrown). */
  async function withRetry(call, onRetry) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        const result = await call();
        if (offline) {
          offline = false;
          setNotice(t("connection_restored"), true);
          setTimeout(() => { if (!offline) setNotice(null); }, 2000);
        }
        return result;
      } catch (error) {
        if (!(error instanceof HttpError) || !core.isRetryable(error.status)) throw error;
        offline = true;
        document.body.dataset.retries = String((parseInt(document.body.dataset.retries || "0", 10)) + 1);
        setNotice(t("connection_lost"));
        if (onRetry) onRetry();
        await sleep(core.retryDelayMs(attempt, RETRY_BASE_MS, RETRY_MAX_MS, Math.random, error.retryAfterS));
      }
    }
  }

  const api = {
    study: () => request("GET", "/studies/" + encodeURIComponent(slug)),
    start: (body) => request("POST", "/studies/" + encodeURIComponent(slug) + "/participants", body),
    next: () => request("POST", "/participant/trials/next", {}, participant.token),
    vote: (body) => request("POST", "/participant/votes", body, participant.token),
    finish: (status) => request("POST", "/participant/finish", { status: status }, participant.token),
    display: (body) => request("POST", "/participant/display", body, participant.token),
  };

  // ------------------------------------------------------------------ images

  function preload(url) {
    if (!preloaded.has(url)) {
      const img = new Image();
      img.decoding = "async";
      img.src = url;
      preloaded.set(url, img.decode().then(() => img));
      if (preloaded.size > 64) preloaded.delete(preloaded.keys().next().value);
    }
    return preloaded.get(url);
  }

  function urlsOf(trial) {
    return [trial.reference_url, trial.left_url, trial.right_url].filter(Boolean);
  }

  /** A fresh decoded <img> for `url` (decoded again from the memory cache: instant). */
  async function decodedImage(url) {
    let img;
    try {
      img = (await preload(url)).cloneNode();
      await img.decode();
    } catch (error) {
      preloaded.delete(url);
      img = new Image();
      img.src = url;
      await img.decode(); // a second failure propagates
    }
    return img;
  }

  function makeMask(width, height, cssW, cssH) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.className = "mask stimulus";
    canvas.style.width = cssW + "px";
    canvas.style.height = cssH + "px";
    const ctx = canvas.getContext("2d");
    const pixels = ctx.createImageData(width, height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const v = Math.floor(Math.random() * 256);
      pixels.data[i] = v;
      pixels.data[i + 1] = Math.floor(Math.random() * 256);
      pixels.data[i + 2] = Math.floor(Math.random() * 256);
      pixels.data[i + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
    return canvas;
  }

  // ------------------------------------------------------------------ frame timing

  const FRAME_SAMPLES = 30; // rAF intervals measured for the frame period

  /** The display's frame period in ms: the median of FRAME_SAMPLES rAF intervals. */
  function measureFramePeriod() {
    return new Promise((resolve) => {
      const stamps = [];
      const tick = (timestamp) => {
        stamps.push(timestamp);
        if (stamps.length > FRAME_SAMPLES) resolve(core.medianFramePeriod(stamps));
        else requestAnimationFrame(tick);
      };
      requestAnimationFrame(tick);
    });
  }

  /**
   * Show `exposureMs` in whole frames: `reveal` runs in one rAF callback (the onset), `hide`
   * in the callback `frames` frames later (see PStudyCore.exposureEnds). Resolves with the
   * timing record once hidden; `cancelled()` true stops it (the answer came first).
   */
  function frameTimedExposure(exposureMs, periodMs, reveal, hide, cancelled) {
    const frames = core.framesFor(exposureMs, periodMs);
    return new Promise((resolve) => {
      requestAnimationFrame((onset) => {
        reveal();
        const tick = (timestamp) => {
          if (cancelled()) return resolve(null);
          if (!core.exposureEnds(timestamp - onset, frames, periodMs)) {
            requestAnimationFrame(tick);
            return;
          }
          hide();
          resolve({
            exposure_requested_ms: exposureMs,
            frame_period_ms: Math.round(periodMs * 1000) / 1000,
            exposure_frames_requested: frames,
            exposure_onset_ms: Math.round(onset * 1000) / 1000,
            exposure_offset_ms: Math.round(timestamp * 1000) / 1000,
            exposure_frames_measured: Math.round((timestamp - onset) / periodMs),
          });
        };
        requestAnimationFrame(tick);
      });
    });
  }

  /**
   * A sequential trial in whole frames: `onPhase(0)` shows the first image in one rAF
   * callback (its onset), `onPhase(1)` the interval's mask, `onPhase(2)` the second image
   * and `onPhase(3)` hides it, each in the callback that ends the phase before
   * (PStudyCore.exposureEnds); an interval of 0 ms shows the second image at once.
   * Resolves with the timing record: the first image in the exposure fields, then the
   * interval and the second image (docs/study_api.md).
   */
  function frameTimedSequence(durationsMs, periodMs, onPhase) {
    const frames = core.sequenceFrames(durationsMs, periodMs);
    const ms = (value) => Math.round(value * 1000) / 1000;
    return new Promise((resolve) => {
      const onsets = [];
      let phase = 0;
      const enter = (next, timestamp) => {
        phase = next;
        onsets[phase] = timestamp;
        if (phase === 1 && frames[1] === 0) return enter(2, timestamp);
        onPhase(phase);
        return undefined;
      };
      const tick = (timestamp) => {
        if (core.exposureEnds(timestamp - onsets[phase], frames[phase], periodMs)) enter(phase + 1, timestamp);
        if (phase < 3) {
          requestAnimationFrame(tick);
          return;
        }
        resolve({
          exposure_requested_ms: durationsMs[0],
          frame_period_ms: ms(periodMs),
          exposure_frames_requested: frames[0],
          exposure_onset_ms: ms(onsets[0]),
          exposure_offset_ms: ms(onsets[1]),
          exposure_frames_measured: Math.round((onsets[1] - onsets[0]) / periodMs),
          isi_requested_ms: durationsMs[1],
          second_requested_ms: durationsMs[2],
          second_frames_requested: frames[2],
          second_onset_ms: ms(onsets[2]),
          second_offset_ms: ms(onsets[3]),
          second_frames_measured: Math.round((onsets[3] - onsets[2]) / periodMs),
        });
      };
      requestAnimationFrame((onset) => {
        enter(0, onset);
        requestAnimationFrame(tick);
      });
    });
  }

  /** The display's frame period for a timed trial: measured again if the first measure
   * was taken while the page was hidden; `valid` false when it is still nonsense (then
   * 60 Hz is assumed and no timing is sent). */
  async function timedFramePeriod() {
    let periodMs = await framePeriod;
    if (!core.validFramePeriod(periodMs)) {
      framePeriod = measureFramePeriod();
      periodMs = await framePeriod;
    }
    const valid = core.validFramePeriod(periodMs);
    return { periodMs: valid ? periodMs : 1000 / 60, valid: valid };
  }

  // ------------------------------------------------------------------ one trial

  function layoutSpace(referenceShown) {
    const stage = $("trial-stage");
    const gap = 24;
    const width = stage.clientWidth || window.innerWidth;
    const top = stage.getBoundingClientRect().top;
    const chrome = 48; // key hints under the images, margins
    const height = Math.max(64, window.innerHeight - top - chrome - (referenceShown ? gap + 24 : 0));
    return {
      w: Math.max(32, (width - gap) / 2 - 8),
      h: Math.max(32, referenceShown ? height / 2 : height),
    };
  }

  /** The mask that fills a sequential trial's interval (and follows the second image). */
  function intervalMask(kind, img, cssW, cssH) {
    if (kind === "noise") return makeMask(img.naturalWidth, img.naturalHeight, cssW, cssH);
    const blank = document.createElement("div");
    blank.className = "mask stimulus" + (kind === "none" ? " blank" : "");
    blank.style.width = cssW + "px";
    blank.style.height = cssH + "px";
    return blank; // "grey": the stimulus background (#777)
  }

  function setSequential(on) {
    const stage = $("trial-stage");
    stage.classList.toggle("sequential", on);
    $("sequence-row").hidden = !on;
    ["choice-left", "choice-right"].forEach((id) => { $(id).disabled = on; });
  }

  /**
   * A sequential trial: the reference (if shown) stays on screen; the first image, the
   * interval, the second image follow in one slot, frame-timed; then the answer buttons
   * (first/second or same/different) are enabled and the response clock starts.
   */
  async function presentSequence(trial, practice, stage, display) {
    const images = await Promise.all([
      trial.reference_url ? decodedImage(trial.reference_url) : Promise.resolve(null),
      decodedImage(trial.left_url),
      decodedImage(trial.right_url),
    ]);
    const [reference, first, second] = images;
    const scale = placeImages(images, Boolean(reference), display);
    const sequence = display.sequence;
    const mask = intervalMask(sequence.isi_mask, first, scale.cssW, scale.cssH);
    const before = intervalMask("none", first, scale.cssW, scale.cssH);
    const slot = $("sequence-slot");
    slot.replaceChildren(before);
    setSequential(true);
    $("reference-row").hidden = !reference;
    $("reference-slot").replaceChildren(...(reference ? [reference] : []));
    const { periodMs, valid } = await timedFramePeriod();
    stage.dataset.phase = "";
    const shown = [first, mask, second, mask];
    const timing = await frameTimedSequence(
      [sequence.first_ms, sequence.isi_ms, sequence.second_ms], periodMs,
      (phase) => {
        if (phase === 0) stage.classList.remove("pending");
        slot.replaceChildren(shown[phase]);
        stage.dataset.phase = String(phase);
      });
    ["choice-left", "choice-right"].forEach((id) => { $(id).disabled = false; });
    await new Promise((resolve) => requestAnimationFrame(() => resolve()));
    const current = { trial: trial, practice: practice, presentedPerf: performance.now(),
      timing: valid && core.sequenceWithinLimits(timing) ? timing : null };
    if (current.timing) stage.dataset.exposure = JSON.stringify(current.timing);
    stage.dataset.ready = "1";
    active = current;
    return new Promise((resolve) => { current.answer = resolve; });
  }

  /** Size the trial's images for the space and style them; the display scale. */
  function placeImages(images, referenceShown, display) {
    const space = layoutSpace(referenceShown);
    const sample = images[1];
    const scale = core.displayScale(
      sample.naturalWidth, sample.naturalHeight, space.w, space.h, window.devicePixelRatio || 1,
      { upscale: display.scale === "auto" || display.scale == null ? "auto" : String(display.scale) }
    );
    images.forEach((img) => {
      if (!img) return;
      img.className = "stimulus" + (scale.pixelated && display.pixelated !== false ? " pixelated" : "");
      img.style.width = scale.cssW + "px";
      img.style.height = scale.cssH + "px";
      img.alt = "";
      img.draggable = false;
    });
    const stage = $("trial-stage");
    stage.dataset.scale = String(scale.factor);
    stage.dataset.cssWidth = scale.cssW.toFixed(2);
    return scale;
  }

  /** Decode the trial's images, put them on screen, resolve once they are visible. */
  async function present(trial, practice) {
    const stage = $("trial-stage");
    stage.classList.add("pending");
    stage.dataset.ready = "0";
    delete stage.dataset.exposure;
    const display = study.display || {};
    stage.dataset.token = trial.token || "";
    $("practice-badge").hidden = !practice;
    $("feedback").textContent = "";
    $("choice-left").classList.remove("chosen");
    $("choice-right").classList.remove("chosen");
    if (display.presentation === "sequential") return presentSequence(trial, practice, stage, display);
    setSequential(false);
    const images = await Promise.all([
      trial.reference_url ? decodedImage(trial.reference_url) : Promise.resolve(null),
      decodedImage(trial.left_url),
      decodedImage(trial.right_url),
    ]);
    const [reference, left, right] = images;
    const scale = placeImages(images, Boolean(reference), display);
    const referenceRow = $("reference-row");
    referenceRow.hidden = !reference;
    $("reference-slot").replaceChildren(...(reference ? [reference] : []));
    $("left-slot").replaceChildren(left);
    $("right-slot").replaceChildren(right);
    const exposure = display.exposure_ms;
    if (!exposure) {
      // Reveal in one frame; the response clock starts at the next frame, when the
      // frame holding all images has been presented.
      await new Promise((resolve) => requestAnimationFrame(() => {
        stage.classList.remove("pending");
        requestAnimationFrame(() => resolve());
      }));
      stage.dataset.ready = "1";
      active = { trial: trial, practice: practice, presentedPerf: performance.now(), timing: null };
      return new Promise((resolve) => { active.answer = resolve; });
    }
    // Limited exposure, in whole frames: masks are drawn before the onset so that the
    // frame that hides the images only swaps elements.
    const slots = [["left-slot", left], ["right-slot", right], ["reference-slot", reference]]
      .filter(([, img]) => img)
      .map(([slot, img]) => [slot, makeMask(img.naturalWidth, img.naturalHeight, scale.cssW, scale.cssH)]);
    const { periodMs, valid: sendTiming } = await timedFramePeriod();
    const current = { trial: trial, practice: practice, presentedPerf: null, timing: null };
    stage.dataset.masked = "0";
    let onsetSeen;
    const onsetDone = new Promise((resolve) => { onsetSeen = resolve; });
    const exposed = frameTimedExposure(exposure, periodMs,
      () => {
        stage.classList.remove("pending");
        requestAnimationFrame(() => onsetSeen()); // the frame holding the images is presented
      },
      () => {
        slots.forEach(([slot, mask]) => $(slot).replaceChildren(mask));
        stage.dataset.masked = "1";
      },
      () => Boolean(current.done));
    await onsetDone;
    current.presentedPerf = performance.now();
    stage.dataset.ready = "1";
    active = current;
    exposed.then((timing) => {
      current.timing = timing && sendTiming && core.timingWithinLimits(timing) ? timing : null;
      if (current.timing) stage.dataset.exposure = JSON.stringify(current.timing);
    });
    return new Promise((resolve) => { current.answer = resolve; });
  }

  /** An answer by side (F / left button or J / right button); the vote's choice is the
   * side (2afc; sequential: left = first) or the JND answer (left = same). */
  function choose(side) {
    if (!active || active.done) return;
    const answeredPerf = performance.now();
    active.done = true; // also stops a running exposure (its trial then has no timing)
    $("choice-" + side).classList.add("chosen");
    const choice = core.answerFor(study.task, side);
    const $stage = $("trial-stage");
    $stage.dataset.ready = "0";
    const current = active;
    active = null;
    current.answer({ choice: choice, presentedPerf: current.presentedPerf, answeredPerf: answeredPerf,
      timing: current.timing });
  }

  // ------------------------------------------------------------------ flow

  async function runPractice() {
    const trials = study.practice || [];
    for (let i = 0; i < trials.length; i += 1) {
      setProgress(i, trials.length, t("practice_progress", { number: i + 1, total: trials.length }));
      show("trial");
      const answer = await present(trials[i], true);
      const expected = trials[i].correct;
      const correct = answer.choice === expected;
      const miss = expected === "same" ? "not_quite_same"
        : expected === "different" ? "not_quite_different" : "not_quite";
      $("feedback").textContent = correct ? t("correct") : t(miss);
      await sleep(correct ? 500 : 1200);
    }
  }

  // ------------------------------------------------------------------ outbox

  /** Answers not yet acknowledged, oldest first (also after a reload). */
  const outbox = (() => {
    const raw = storage.getItem(storeKey("outbox"));
    const stored = raw ? JSON.parse(raw) : [];
    const legacy = storage.getItem(storeKey("pending")); // a page from before the outbox
    if (legacy) {
      const body = JSON.parse(legacy);
      if (!stored.some((b) => b.trial_token === body.trial_token)) stored.push(body);
      storage.removeItem(storeKey("pending"));
    }
    return stored;
  })();
  let sending = null; // the running sender, if any

  function saveOutbox() {
    storage.setItem(storeKey("outbox"), JSON.stringify(outbox));
    document.body.dataset.outbox = String(outbox.length);
    if (offline && outbox.length) {
      setNotice(outbox.length === 1 ? t("answer_kept") : t("answers_kept", { count: outbox.length }));
    }
  }

  /** Send the outbox in order, each vote until acknowledged or refused for good.
   * Resolves when it is empty; a 401 (the session is gone) rejects. */
  function sendOutbox() {
    if (!sending) {
      sending = (async () => {
        while (outbox.length) {
          const body = outbox[0];
          try {
            await withRetry(() => api.vote(body), saveOutbox);
            answered.add(body.trial_token);
          } catch (error) {
            if (error.status === 401) throw error;
            // 4xx: the trial expired or is no longer this participant's; the server
            // kept nothing, the page moves on.
            progress.answered = Math.max(0, progress.answered - 1);
            setProgress(progress.answered, progress.total);
            setNotice(t("answer_refused", { reason: error.message }), false);
            setTimeout(() => setNotice(null), 3000);
          }
          outbox.shift();
          saveOutbox();
        }
      })().finally(() => { sending = null; });
    }
    return sending;
  }

  /** Ask for the open trials (topped up by the server) and preload their images. */
  async function refill() {
    const data = await withRetry(() => api.next());
    if (data.progress) {
      // A refill that ran while a vote was in flight may report one answer fewer.
      progress = { answered: Math.max(progress.answered, data.progress.answered), total: data.progress.total };
    }
    queue = data.trials.filter((t) => !answered.has(t.token) && !seen.has(t.token));
    // every fetched trial, so all of them can be answered through a connection loss
    queue.forEach((t) => urlsOf(t).forEach((url) => preload(url).catch(() => null)));
    return data;
  }

  async function runMain() {
    const sent = sendOutbox(); // answers stored by an earlier page go first
    await sent;
    let data = await refill();
    // A refill running while the participant answers; it waits for the answers sent so
    // far, so the server tops the batch up and the next trials are preloaded in time.
    let prefetch = null;
    const startPrefetch = () => {
      if (prefetch) return;
      prefetch = sendOutbox()
        .then(() => refill())
        .then((fresh) => { if (fresh) data = fresh; })
        .catch(() => null)
        .finally(() => { prefetch = null; });
    };
    for (;;) {
      if (queue.length === 0) {
        if (prefetch) await prefetch;
        if (queue.length === 0) {
          await sendOutbox(); // the server counts our answers before it says what is left
          data = await refill();
        }
        if (queue.length === 0) {
          if (data.done) break;
          show("waiting");
          $("waiting-message").textContent = data.study_status === "paused"
            ? t("paused_waiting") : t("waiting");
          await sleep(POLL_MS);
          continue;
        }
      }
      const trial = queue.shift();
      seen.add(trial.token);
      setProgress(progress.answered, progress.total);
      show("trial");
      const shown = present(trial, false);
      const answer = await shown;
      const viewport = { w: window.innerWidth, h: window.innerHeight };
      outbox.push({
        trial_token: trial.token,
        choice: answer.choice,
        rt_ms: Math.round((answer.answeredPerf - answer.presentedPerf) * 1000) / 1000,
        presented_at: new Date(performance.timeOrigin + answer.presentedPerf).toISOString(),
        answered_at: new Date(performance.timeOrigin + answer.answeredPerf).toISOString(),
        viewport_w: viewport.w,
        viewport_h: viewport.h,
        device_pixel_ratio: window.devicePixelRatio || 1,
        ...(answer.timing || {}), // frame-timed exposure (docs/study_api.md)
      });
      saveOutbox();
      progress.answered += 1;
      setProgress(progress.answered, progress.total);
      sendOutbox().catch(() => null); // a 401 surfaces at the next await below
      if (queue.length < PRELOAD_AHEAD) startPrefetch();
      await maybeBreak();
    }
    await sendOutbox();
    await complete();
  }

  /** A pause screen after every `break_every` answers (not after the last one). */
  async function maybeBreak() {
    const every = study.break_every;
    if (!every || progress.answered % every !== 0 || progress.answered >= progress.total) return;
    $("break-message").textContent = t("break_message", { answered: progress.answered, total: progress.total });
    show("break");
    await waitForClick("continue-button");
  }

  /** Back stays in the study: an extra history entry catches it, and leaving is asked. */
  let guardingBack = false;
  function stayOnBack() {
    if (guardingBack || preview) return;
    guardingBack = true;
    history.pushState({ pstudy: "study" }, "", window.location.href);
    window.addEventListener("popstate", () => {
      if (!guardingBack) return;
      const leave = window.confirm(t("leave_study"));
      if (leave) {
        guardingBack = false;
        history.back();
      } else {
        history.pushState({ pstudy: "study" }, "", window.location.href);
      }
    });
  }

  async function complete() {
    guardingBack = false;
    let result;
    try {
      result = await withRetry(() => api.finish("completed"));
    } catch (error) {
      if (error.body && (error.body.code === "trials_remaining" || error.body.code === "trials_open")) {
        return runMain();
      }
      throw error;
    }
    storage.setItem(storeKey("stage"), "done");
    setProgress(progress.total, progress.total);
    show("done");
    const code = result.completion_code;
    $("completion-code-box").hidden = !code;
    $("completion-code").textContent = code || "";
    if (result.redirect_url) {
      const link = $("redirect-link");
      link.href = result.redirect_url;
      $("redirect-box").hidden = false;
      if (!preview) setTimeout(() => window.location.assign(result.redirect_url), REDIRECT_DELAY_MS);
    }
  }

  function prolificParams() {
    const params = new URLSearchParams(window.location.search);
    const body = {};
    [["PROLIFIC_PID", "prolific_pid"], ["STUDY_ID", "study_id"], ["SESSION_ID", "session_id"]].forEach(([key, field]) => {
      const value = params.get(key);
      if (value) body[field] = value;
    });
    return body;
  }

  async function startParticipant(allowNew) {
    const body = prolificParams();
    const token = storage.getItem(storeKey("token"));
    if (token) body.participant_token = token;
    if (preview) body.preview = true;
    if (!allowNew && !token && !body.prolific_pid) return null;
    let data;
    try {
      data = await withRetry(() => api.start(body));
    } catch (error) {
      if (error.body && error.body.code === "unknown_participant") {
        storage.removeItem(storeKey("token"));
        outbox.length = 0;
        saveOutbox();
        return startParticipant(allowNew);
      }
      throw error;
    }
    participant = data.participant;
    progress = participant.progress;
    storage.setItem(storeKey("token"), participant.token);
    return data;
  }

  /** The display step (calibration.js); false when it failed for good (the page says why). */
  async function prepareDisplay() {
    try {
      await display.prepare({ study: study, participant: participant, t: t, show: show,
        report: (body) => withRetry(() => api.display(body)) });
      return true;
    } catch (error) {
      fail(t("went_wrong", { reason: error.message }));
      return false;
    }
  }

  function waitForClick(id) {
    return new Promise((resolve) => $(id).addEventListener("click", resolve, { once: true }));
  }

  function screenTooSmall() {
    const minWidth = study.display && study.display.min_viewport_w;
    return Boolean(minWidth) && window.innerWidth < minWidth;
  }

  async function ensureScreenSize() {
    while (screenTooSmall()) {
      $("refused-message").textContent = t("screen_too_small", { minimum: study.display.min_viewport_w, width: window.innerWidth });
      show("refused");
      await new Promise((resolve) => window.addEventListener("resize", resolve, { once: true }));
    }
  }

  async function main() {
    show("loading");
    try {
      study = (await withRetry(api.study)).study;
    } catch (error) {
      fail(error.status === 404 ? t("no_such_study") : t("study_not_loaded", { reason: error.message }));
      return;
    }
    const display = study.display || {};
    if (display.exposure_ms || display.presentation === "sequential") framePeriod = measureFramePeriod();
    const labels = study.task === "jnd" ? ["answer_same", "answer_different"] : ["answer_first", "answer_second"];
    $("left-label").textContent = t(labels[0]);
    $("right-label").textContent = t(labels[1]);
    if (display.presentation === "sequential") {
      $("choice-left").setAttribute("aria-label", t(labels[0]) + " (F / ←)");
      $("choice-right").setAttribute("aria-label", t(labels[1]) + " (J / →)");
    }
    document.title = study.title;
    $("question").textContent = study.question;
    $("consent-text").textContent = study.consent;
    $("instructions-text").textContent = study.instructions;
    if (touch) $("question").title = t("tap_hint");
    await ensureScreenSize();

    // Returning with the same link (stored token, or the same PROLIFIC_PID)?
    let resumed = null;
    try {
      resumed = await startParticipant(false);
    } catch (error) {
      fail(error.message);
      return;
    }
    if (!resumed && !preview && study.status !== "live") {
      fail(study.status === "closed"
        ? t("closed_to_new") : t("paused_to_new"));
      return;
    }
    const stage = storage.getItem(storeKey("stage"));
    if (resumed && participant.status === "completed") {
      await complete();
      return;
    }
    if (resumed && participant.status === "returned") {
      fail(t("withdrawn_already"));
      return;
    }
    const skipIntro = resumed && (stage === "main" || progress.answered > 0 || outbox.length > 0);
    if (!skipIntro) {
      show("consent");
      const agreed = await new Promise((resolve) => {
        $("consent-form").addEventListener("submit", (event) => { event.preventDefault(); resolve(true); }, { once: true });
        $("decline").addEventListener("click", () => resolve(false), { once: true });
      });
      if (!agreed) {
        if (participant) {
          // A Prolific link registered the person already: record that they left.
          await api.finish("returned").catch(() => null);
          storage.removeItem(storeKey("token"));
        }
        show("declined");
        return;
      }
      if (!participant) {
        try {
          await startParticipant(true);
        } catch (error) {
          fail(error.body && error.body.code && error.body.code.startsWith("study_")
            ? t("not_accepting") : t("could_not_start", { reason: error.message }));
          return;
        }
      }
      show("instructions");
      $("start-button").textContent = (study.practice || []).length ? t("start_practice") : t("start");
      await waitForClick("start-button");
      stayOnBack();
      if (!(await prepareDisplay())) return;
      await runPractice();
      if ((study.practice || []).length) {
        show("main-start"); // the real trials start now
        await waitForClick("start-main-button");
      }
      storage.setItem(storeKey("stage"), "main");
    } else if (!(await prepareDisplay())) {
      return;
    }
    stayOnBack(); // also for a page that resumed straight into the trials
    try {
      await runMain();
    } catch (error) {
      if (error.status === 401) {
        storage.removeItem(storeKey("token"));
        fail(t("session_invalid"));
      } else if (error.body && error.body.code === "study_closed") {
        fail(t("study_closed_midway"));
      } else {
        fail(t("went_wrong", { reason: error.message }));
      }
    }
  }

  // ------------------------------------------------------------------ input

  document.addEventListener("keydown", (event) => {
    if (event.repeat || event.altKey || event.ctrlKey || event.metaKey) return;
    if (!active) return;
    const choice = core.keyToChoice(event.key);
    if (choice) {
      event.preventDefault();
      choose(choice);
    }
  });
  $("choice-left").addEventListener("click", () => choose("left"));
  $("choice-right").addEventListener("click", () => choose("right"));
  let withdrawing = false;
  $("withdraw").addEventListener("click", async () => {
    if (withdrawing || !participant) return;
    if (!window.confirm(t("confirm_withdraw"))) return;
    withdrawing = true;
    active = null; // ignore further answers
    try {
      await sendOutbox();
      await withRetry(() => api.finish("returned"));
    } catch (error) {
      if (!(error.body && error.body.code === "participant_finished")) {
        withdrawing = false;
        fail(t("could_not_withdraw", { reason: error.message }));
        return;
      }
    }
    ["token", "outbox", "stage"].forEach((name) => storage.removeItem(storeKey(name)));
    show("withdrawn");
  });
  window.addEventListener("online", () => { if (offline) setNotice(t("back_online"), true); });

  main();
})();
