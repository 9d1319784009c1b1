/* Pure helpers of the participant page (no DOM, no network): display scale, key
 * mapping, retry delays, frame timing. Loaded before participant.js; exported on window.PStudyCore. */
(function (global) {
  "use strict";

  /**
   * How large to draw a stimulus of `imageW`×`imageH` image pixels.
   * Small stimuli are enlarged by the largest integer factor that fits the space
   * (each image pixel becomes factor×factor *device* pixels, so CSS size =
   * image size × factor / devicePixelRatio); with `upscale` "off" or when factor 1 is
   * the largest that fits, images are drawn 1:1 in device pixels. Images larger than
   * the space are shrunk (smoothly) and flagged `fits: false`.
   * @param {number} imageW image width in pixels
   * @param {number} imageH image height in pixels
   * @param {number} spaceW available CSS pixels per image, horizontally
   * @param {number} spaceH available CSS pixels per image, vertically
   * @param {number} dpr window.devicePixelRatio (> 0)
   * @param {{upscale?: string, maxCssScale?: number}} options upscale "auto" (default),
   *   "off", or an integer string forcing that factor in device pixels (lowered to what
   *   fits); maxCssScale caps "auto" at that many CSS pixels per image pixel (16)
   * @returns {{factor: number, cssW: number, cssH: number, pixelated: boolean, fits: boolean}}
   */
  function displayScale(imageW, imageH, spaceW, spaceH, dpr, options) {
    const opts = options || {};
    const ratio = dpr > 0 ? dpr : 1;
    // At most `maxCssScale` CSS pixels per image pixel, in device pixels.
    const maxFactor = Math.max(1, Math.floor((opts.maxCssScale || 16) * ratio));
    const fitFactor = Math.floor(Math.min((spaceW * ratio) / imageW, (spaceH * ratio) / imageH));
    let factor;
    if (opts.upscale === "off") {
      factor = 1;
    } else if (opts.upscale && /^\d+$/.test(String(opts.upscale))) {
      factor = Math.max(1, Math.min(parseInt(opts.upscale, 10), fitFactor));
    } else {
      factor = Math.max(1, Math.min(fitFactor, maxFactor));
    }
    let cssW = (imageW * factor) / ratio;
    let cssH = (imageH * factor) / ratio;
    let fits = cssW <= spaceW + 0.5 && cssH <= spaceH + 0.5;
    if (!fits) {
      const shrink = Math.min(spaceW / cssW, spaceH / cssH);
      cssW *= shrink;
      cssH *= shrink;
    }
    return { factor: factor, cssW: cssW, cssH: cssH, pixelated: factor > 1 && fits, fits: fits };
  }

  /** "left" for F and ←, "right" for J and →, else null. */
  function keyToChoice(key) {
    switch (key) {
      case "f": case "F": case "ArrowLeft": return "left";
      case "j": case "J": case "ArrowRight": return "right";
      default: return null;
    }
  }

  /**
   * Delay before retry number `attempt` (0-based) in milliseconds: exponential backoff
   * from `baseMs`, capped at `maxMs`, with ±20 % jitter from `random` (a function
   * returning [0, 1)); a server's Retry-After (seconds) wins when larger.
   */
  function retryDelayMs(attempt, baseMs, maxMs, random, retryAfterS) {
    const raw = Math.min(maxMs, baseMs * Math.pow(2, attempt));
    const jitter = 0.8 + 0.4 * (random ? random() : Math.random());
    const delay = Math.round(raw * jitter);
    const serverMs = retryAfterS ? retryAfterS * 1000 : 0;
    return Math.max(delay, serverMs);
  }

  /** Whether an HTTP status means "try again later" (network error = status 0). */
  function isRetryable(status) {
    return status === 0 || status === 408 || status === 425 || status === 429 || status >= 500;
  }

  /**
   * The display's frame period from requestAnimationFrame timestamps: the median of the
   * intervals between consecutive timestamps (robust to a dropped frame or two).
   * @param {number[]} timestamps rAF timestamps in milliseconds, ascending (≥ 2)
   * @returns {number} frame period in milliseconds (NaN with fewer than 2 timestamps)
   */
  function medianFramePeriod(timestamps) {
    const intervals = [];
    for (let i = 1; i < timestamps.length; i += 1) intervals.push(timestamps[i] - timestamps[i - 1]);
    if (!intervals.length) return NaN;
    intervals.sort((a, b) => a - b);
    const middle = Math.floor(intervals.length / 2);
    return intervals.length % 2 ? intervals[middle] : (intervals[middle - 1] + intervals[middle]) / 2;
  }

  /** Whole frames closest to `ms` at `periodMs` per frame, at least one. */
  function framesFor(ms, periodMs) {
    return Math.max(1, Math.round(ms / periodMs));
  }

  /**
   * Whether a rAF callback at `elapsedMs` after the onset frame is the one that ends an
   * exposure of `frames` frames: the first callback at least `frames - ½` periods after the
   * onset (a late or dropped frame does not lengthen the exposure by a whole frame).
   */
  function exposureEnds(elapsedMs, frames, periodMs) {
    return elapsedMs >= (frames - 0.5) * periodMs;
  }

  // The API's limits on the timing fields (study_app/api.py, docs/study_api.md).
  const TIMING_LIMITS = { period: [2, 200], frames: 100000, exposureMs: 60000 };

  /** Whether a frame period (ms) is one the API accepts (500 Hz … 5 Hz displays). */
  function validFramePeriod(periodMs) {
    return periodMs >= TIMING_LIMITS.period[0] && periodMs <= TIMING_LIMITS.period[1];
  }

  /**
   * Whether a timing record is within the API's limits, so that sending it cannot get
   * the vote refused (a tab hidden for many minutes during an exposure is not).
   */
  function timingWithinLimits(timing) {
    return validFramePeriod(timing.frame_period_ms) &&
      timing.exposure_requested_ms >= 1 && timing.exposure_requested_ms <= TIMING_LIMITS.exposureMs &&
      timing.exposure_frames_requested <= TIMING_LIMITS.frames &&
      timing.exposure_frames_measured <= TIMING_LIMITS.frames &&
      timing.exposure_offset_ms >= timing.exposure_onset_ms;
  }

  /**
   * Whether a sequential trial's interval and second image (the fields after the first
   * image's timing record) are within the API's limits and in order.
   */
  function sequenceWithinLimits(timing) {
    return timingWithinLimits(timing) &&
      timing.isi_requested_ms >= 0 && timing.isi_requested_ms <= TIMING_LIMITS.exposureMs &&
      timing.second_requested_ms >= 1 && timing.second_requested_ms <= TIMING_LIMITS.exposureMs &&
      timing.second_frames_requested <= TIMING_LIMITS.frames &&
      timing.second_frames_measured <= TIMING_LIMITS.frames &&
      timing.second_onset_ms >= timing.exposure_offset_ms &&
      timing.second_offset_ms >= timing.second_onset_ms;
  }

  /**
   * Frames per phase of a sequential trial: the first image, the interval (0 frames when
   * 0 ms: the second image follows at once), the second image.
   * @param {number[]} durationsMs [first, isi, second] in milliseconds
   * @param {number} periodMs frame period in milliseconds
   * @returns {number[]} whole frames per phase
   */
  function sequenceFrames(durationsMs, periodMs) {
    return durationsMs.map((ms, phase) => (phase === 1 && ms === 0 ? 0 : framesFor(ms, periodMs)));
  }

  /** The vote's choice for the left (F) / right (J) answer: JND "same" / "different". */
  function answerFor(task, side) {
    if (task !== "jnd") return side;
    return side === "left" ? "same" : "different";
  }

  global.PStudyCore = {
    sequenceWithinLimits: sequenceWithinLimits,
    sequenceFrames: sequenceFrames,
    answerFor: answerFor,
    validFramePeriod: validFramePeriod,
    timingWithinLimits: timingWithinLimits,
    medianFramePeriod: medianFramePeriod,
    framesFor: framesFor,
    exposureEnds: exposureEnds,
    displayScale: displayScale,
    keyToChoice: keyToChoice,
    retryDelayMs: retryDelayMs,
    isRetryable: isRetryable,
  };
})(window);
