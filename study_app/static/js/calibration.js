/* The display step before the trials: the credit-card calibration (CSS pixels per mm),
 * the blind-spot viewing distance (pixels per degree), the refusal of a scaled page, and
 * fullscreen (leaving it pauses the study until the participant returns).
 *
 * participant.js calls PStudyDisplay.prepare(env) between the instructions and the
 * practice trials (and on a resumed page before the trials). Every measurement goes to
 * POST /participant/display, where the server derives px/mm, the viewing distance and
 * px/deg itself and judges them against the study's settings (study_app/calibration.py);
 * the page only shows the verdict. docs/participant_pages.md describes the screens.
 * Loaded before participant.js; exported on window.PStudyDisplay.
 */
(function (global) {
  "use strict";

  const CARD_MM = [85.6, 53.98]; // ISO/IEC 7810 ID-1
  const BLIND_SPOT_REPEATS = 3; // measurements averaged
  const DOT_SPEED_MM_S = 50; // the moving dot's speed on the screen
  const DOT_START_MM = 10; // where the dot starts, left of the fixation square's centre
  // The server's rules (study_app/calibration.py): an integer devicePixelRatio, 100 % zoom.
  const DPR_TOLERANCE = 1e-3;
  const ZOOM_TOLERANCE = 0.05;
  const FINAL_STATES = ["done", "failed", "withdrawn", "declined"];

  // ------------------------------------------------------------------ pure helpers

  /**
   * The browser zoom (1 = 100 %) estimated from the window's outer and inner widths
   * (outerWidth is in screen pixels, innerWidth in CSS pixels); null where it means
   * nothing (touch devices, whose inner width follows pinch zoom) or is implausible.
   */
  function zoomEstimate(outerWidth, innerWidth, coarsePointer) {
    if (coarsePointer || !(outerWidth > 0) || !(innerWidth > 0)) return null;
    const zoom = outerWidth / innerWidth;
    return zoom >= 0.25 && zoom <= 5 ? Math.round(zoom * 1000) / 1000 : null;
  }

  /** Whether stimuli are drawn unscaled: an integer devicePixelRatio ≥ 1 and (when known) 100 % zoom. */
  function unscaled(dpr, zoom) {
    const integer = Math.abs(dpr - Math.round(dpr)) <= DPR_TOLERANCE && Math.round(dpr) >= 1;
    return integer && (zoom == null || Math.abs(zoom - 1) <= ZOOM_TOLERANCE);
  }

  /** CSS pixels per millimetre from the card outline's width in CSS pixels. */
  function pxPerMm(cardWidthPx) {
    return cardWidthPx / CARD_MM[0];
  }

  const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;
  const round3 = (x) => Math.round(x * 1000) / 1000;
  const $ = (id) => document.getElementById(id);

  /** What every report carries: devicePixelRatio, screen size (CSS px), zoom estimate. */
  function baseReport() {
    return {
      device_pixel_ratio: window.devicePixelRatio || 1,
      screen_w: Math.round(window.screen.width),
      screen_h: Math.round(window.screen.height),
      zoom_estimate: zoomEstimate(window.outerWidth, window.innerWidth,
        window.matchMedia("(pointer: coarse)").matches),
    };
  }

  function once(target, type) {
    return new Promise((resolve) => target.addEventListener(type, resolve, { once: true }));
  }

  /** Resolves with the id of the first of `ids` clicked. */
  function firstClick(ids) {
    return new Promise((resolve) => {
      const handlers = ids.map((id) => {
        const handler = () => {
          ids.forEach((other, i) => $(other).removeEventListener("click", handlers[i]));
          resolve(id);
        };
        $(id).addEventListener("click", handler);
        return handler;
      });
    });
  }

  // ------------------------------------------------------------------ the card

  /** The card step: resolves with the matched outline's width in CSS px, or null (skipped). */
  async function cardStep(env, req) {
    env.show("calibration-card");
    const outline = $("card-outline");
    const slider = $("card-size");
    const area = outline.parentElement;
    const maxWidth = Math.max(200, Math.floor(area.clientWidth - 8));
    const minWidth = 80;
    slider.min = String(minWidth);
    slider.max = String(maxWidth);
    slider.step = "0.5";
    const setWidth = (width) => {
      const w = Math.min(maxWidth, Math.max(minWidth, width));
      outline.style.width = w + "px";
      outline.style.height = (w * CARD_MM[1]) / CARD_MM[0] + "px";
      slider.value = String(w);
      slider.setAttribute("aria-valuetext", Math.round(w) + " px");
      outline.dataset.width = String(w);
    };
    // start near 96 dpi (3.78 CSS px per mm, the CSS reference pixel), on the slider's grid
    setWidth(parseFloat(outline.dataset.width) || Math.round((CARD_MM[0] * 96) / 25.4));
    $("card-skip").hidden = req.mode !== "optional";

    const onSlide = () => setWidth(parseFloat(slider.value));
    const smaller = () => setWidth(parseFloat(outline.dataset.width) - 1);
    const larger = () => setWidth(parseFloat(outline.dataset.width) + 1);
    let drag = null;
    const handle = $("card-handle");
    const onDown = (event) => {
      drag = { x: event.clientX, width: parseFloat(outline.dataset.width) };
      handle.setPointerCapture(event.pointerId);
      event.preventDefault();
    };
    const onMove = (event) => { if (drag) setWidth(drag.width + event.clientX - drag.x); };
    const onUp = () => { drag = null; };
    const listeners = [[slider, "input", onSlide], [$("card-smaller"), "click", smaller],
      [$("card-larger"), "click", larger], [handle, "pointerdown", onDown],
      [handle, "pointermove", onMove], [handle, "pointerup", onUp], [handle, "pointercancel", onUp]];
    listeners.forEach(([el, type, fn]) => el.addEventListener(type, fn));
    const choice = await firstClick(["card-done", "card-skip"]);
    listeners.forEach(([el, type, fn]) => el.removeEventListener(type, fn));
    return choice === "card-done" ? outline.getBoundingClientRect().width : null;
  }

  // ------------------------------------------------------------------ the blind spot

  /**
   * One sweep of the dot from DOT_START_MM left of the fixation square's centre towards
   * the left edge; resolves with the centre-to-centre distance (CSS px) when the
   * participant reports that it disappeared, or null when it reached the edge unseen.
   */
  function sweep(area, dot, fixationX, pxMm) {
    const speed = DOT_SPEED_MM_S * pxMm; // CSS px per second
    const start = DOT_START_MM * pxMm;
    dot.hidden = false; // shown first: its width centres it and bounds the sweep
    const limit = fixationX - dot.offsetWidth;
    return new Promise((resolve) => {
      let offset = start;
      let last = null;
      let finished = false;
      const place = () => {
        dot.style.left = fixationX - offset - dot.offsetWidth / 2 + "px";
        area.dataset.offset = offset.toFixed(2);
      };
      const end = (value) => {
        if (finished) return;
        finished = true;
        document.removeEventListener("keydown", onKey);
        $("distance-seen").removeEventListener("click", onSeen);
        dot.hidden = true;
        resolve(value);
      };
      const onKey = (event) => {
        if (event.repeat) return; // a key held down since the sweep began
        if (event.key === " " || event.key === "Enter") {
          event.preventDefault();
          end(offset);
        }
      };
      // keyboard "clicks" (detail 0) are the keys above, already counted
      const onSeen = (event) => { if (event.detail !== 0) end(offset); };
      const tick = (now) => {
        if (finished) return;
        if (last !== null) offset += (speed * (now - last)) / 1000;
        last = now;
        if (offset > limit) return end(null);
        place();
        requestAnimationFrame(tick);
      };
      place();
      document.addEventListener("keydown", onKey);
      $("distance-seen").addEventListener("click", onSeen);
      requestAnimationFrame(tick);
    });
  }

  /** The blind-spot step: resolves with the mean fixation-to-blind-spot distance (CSS
   * px) over BLIND_SPOT_REPEATS sweeps, or null (skipped). */
  async function distanceStep(env, req, pxMm) {
    const t = env.t;
    env.show("calibration-distance");
    const area = $("blind-spot-area");
    const dot = $("blind-spot-dot");
    const fixation = $("fixation");
    $("distance-skip").hidden = req.viewing_distance !== "optional";
    $("distance-start").hidden = false;
    $("distance-seen").hidden = true;
    $("distance-status").textContent = "";
    area.dataset.running = "0";
    const choice = await firstClick(["distance-start", "distance-skip"]);
    if (choice === "distance-skip") return null;
    $("distance-start").hidden = true;
    $("distance-skip").hidden = true;
    $("distance-seen").hidden = false;
    const fixationX = fixation.offsetLeft + fixation.offsetWidth / 2;
    const offsets = [];
    area.dataset.running = "1";
    area.dataset.measured = "";
    while (offsets.length < BLIND_SPOT_REPEATS) {
      $("distance-status").textContent = t("distance_progress",
        { number: offsets.length + 1, total: BLIND_SPOT_REPEATS });
      area.dataset.sweep = String(offsets.length + 1);
      const offset = await sweep(area, dot, fixationX, pxMm);
      if (offset === null) {
        $("distance-status").textContent = t("dot_missed");
        await new Promise((resolve) => setTimeout(resolve, 1200));
      } else {
        offsets.push(offset);
        area.dataset.measured = offsets.map((x) => x.toFixed(3)).join(" "); // state, as data-*
        await new Promise((resolve) => setTimeout(resolve, 500)); // look back at the square
      }
    }
    area.dataset.running = "0";
    return mean(offsets);
  }

  // ------------------------------------------------------------------ verdicts

  function scaledText(t, report) {
    return report.zoom_estimate != null && Math.abs(report.zoom_estimate - 1) > ZOOM_TOLERANCE
      ? t("zoom_not_100", { zoom: Math.round(report.zoom_estimate * 100) })
      : t("display_scaled", { ratio: round3(report.device_pixel_ratio) });
  }

  /** Show what to change; resolves when the participant asks to check again (or the
   * window changes size, as it does when the zoom changes). */
  async function refuse(env, messages) {
    const list = $("display-problems");
    list.replaceChildren(...messages.map((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      return item;
    }));
    env.show("display-refused");
    await Promise.race([once($("display-retry"), "click"), once(window, "resize")]);
  }

  async function checkDisplay(env, req) {
    const t = env.t;
    for (;;) {
      const body = baseReport();
      if (req.require_unscaled && !unscaled(body.device_pixel_ratio, body.zoom_estimate)) {
        await refuse(env, [scaledText(t, body)]);
        continue;
      }
      if (req.mode && req.mode !== "off") {
        const width = await cardStep(env, req);
        if (width !== null) {
          body.card_width_px = round3(width);
          if (req.viewing_distance !== "off") {
            const spot = await distanceStep(env, req, pxPerMm(width));
            if (spot !== null) body.blind_spot_px = round3(spot);
          }
        }
      }
      let verdict;
      try {
        verdict = (await env.report(body)).display;
      } catch (error) {
        if (error.body && error.body.code === "implausible_distance") {
          await refuse(env, [t("implausible_distance")]);
          continue;
        }
        throw error;
      }
      env.participant.display = verdict;
      document.body.dataset.display = verdict.status;
      if (verdict.passed) return verdict;
      await refuse(env, verdict.problems.map((problem) => (problem.code === "too_few_px_per_deg"
        ? t("too_few_px_per_deg", { value: verdict.px_per_deg.toFixed(1), minimum: req.min_px_per_deg })
        : scaledText(t, body))));
    }
  }

  // ------------------------------------------------------------------ fullscreen

  let guarding = false;
  let watching = false;

  /** Ask for fullscreen (a click is needed); resolves once the page is fullscreen. */
  async function enterFullscreen(env) {
    if (document.fullscreenElement) return;
    const message = $("fullscreen-message");
    env.show("fullscreen");
    if (!document.fullscreenEnabled || !document.documentElement.requestFullscreen) {
      message.textContent = env.t("fullscreen_unavailable");
      $("fullscreen-button").hidden = true;
      return new Promise(() => {}); // nothing the participant can do on this browser
    }
    for (;;) {
      await once($("fullscreen-button"), "click");
      try {
        await document.documentElement.requestFullscreen();
        message.textContent = "";
        return;
      } catch (error) {
        message.textContent = env.t("fullscreen_refused", { reason: error.message });
      }
    }
  }

  // ------------------------------------------------------------------ pauses

  // Why the study is paused, each with its overlay and the button focused on it.
  const PAUSES = {
    fullscreen: { overlay: "fullscreen-paused", button: "fullscreen-return" },
    scaling: { overlay: "scaling-paused", button: "scaling-check" },
  };
  const paused = new Set();
  let blocking = false;

  /**
   * Pause (`on`) or resume for `reason`: its overlay covers the page, everything behind
   * the overlays is inert, and no key reaches the trial (a capturing listener stops it;
   * Tab and the keys on an overlay's button keep their default action). Answers already
   * given stay in the outbox and are sent as usual, so nothing is lost or sent twice.
   */
  function setPause(reason, on) {
    if (on && FINAL_STATES.includes(document.body.dataset.state)) on = false;
    if (on === paused.has(reason)) return;
    if (on) paused.add(reason); else paused.delete(reason);
    const overlays = Object.values(PAUSES).map((p) => $(p.overlay));
    overlays.forEach((el) => { el.hidden = !Object.keys(PAUSES).some(
      (name) => paused.has(name) && PAUSES[name].overlay === el.id); });
    Array.from(overlays[0].parentElement.children).forEach((el) => {
      if (!overlays.includes(el) && el.id !== "connection-notice") el.inert = paused.size > 0;
    });
    if (paused.size) {
      document.body.dataset.paused = Array.from(paused).join(" ");
      if (on) $(PAUSES[reason].button).focus();
    } else {
      delete document.body.dataset.paused;
    }
    if (!blocking) {
      blocking = true;
      const block = (event) => {
        if (!paused.size) return;
        event.stopImmediatePropagation();
        const onOverlay = overlays.some((el) => !el.hidden && el.contains(event.target));
        if (!onOverlay && event.key !== "Tab") event.preventDefault();
      };
      window.addEventListener("keydown", block, true);
      window.addEventListener("keyup", block, true);
    }
  }

  /** Leaving fullscreen pauses the study; returning to fullscreen resumes it. */
  function guardFullscreen(env) {
    if (guarding) return;
    guarding = true;
    document.addEventListener("fullscreenchange", () => {
      setPause("fullscreen", !document.fullscreenElement);
    });
    $("fullscreen-return").addEventListener("click", () => {
      $("paused-message").textContent = "";
      document.documentElement.requestFullscreen().catch((error) => {
        $("paused-message").textContent = env.t("fullscreen_refused", { reason: error.message });
      });
    });
    if (!document.fullscreenElement) setPause("fullscreen", true);
  }

  const SCALING_POLL_MS = 1000;

  /**
   * A page that becomes scaled during the study (browser zoom, a window moved to a screen
   * with another pixel ratio) pauses it, saying what to change, until it is unscaled
   * again: checked on every resize, pixel-ratio change and "Check again", and once a
   * second besides (not every browser fires an event for every change of scale, e.g.
   * an emulated one; the check reads no layout).
   */
  function watchScaling(env) {
    const check = () => {
      const report = baseReport();
      const scaled = !unscaled(report.device_pixel_ratio, report.zoom_estimate);
      if (scaled) $("scaling-paused-message").textContent = scaledText(env.t, report);
      setPause("scaling", scaled);
    };
    const watchRatio = () => {
      window.matchMedia("(resolution: " + window.devicePixelRatio + "dppx)")
        .addEventListener("change", () => { check(); watchRatio(); }, { once: true });
    };
    window.addEventListener("resize", check);
    $("scaling-check").addEventListener("click", check);
    watchRatio();
    setInterval(check, SCALING_POLL_MS);
  }

  /**
   * The display step: the check (card, blind spot, scaling) when the study asks for one
   * and it has not passed yet (or the page is scaled now), then fullscreen if required.
   * `env`: {study, participant, t, show, report(body) → Promise of the API's answer}.
   */
  async function prepare(env) {
    const req = env.study.calibration || { mode: "off" };
    const stepShown = (req.mode && req.mode !== "off") || req.require_unscaled ||
      req.min_px_per_deg != null;
    const status = env.participant.display && env.participant.display.status;
    const now = baseReport();
    const scaledNow = req.require_unscaled && !unscaled(now.device_pixel_ratio, now.zoom_estimate);
    if (stepShown && (status !== "passed" || scaledNow)) await checkDisplay(env, req);
    if (req.require_unscaled && !watching) {
      watching = true;
      watchScaling(env);
    }
    if (req.require_fullscreen) {
      await enterFullscreen(env);
      guardFullscreen(env);
    }
  }

  global.PStudyDisplay = {
    screens: ["calibration-card", "calibration-distance", "display-refused", "fullscreen"],
    prepare: prepare,
    zoomEstimate: zoomEstimate,
    unscaled: unscaled,
    pxPerMm: pxPerMm,
  };
})(window);
