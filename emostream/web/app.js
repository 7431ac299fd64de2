/* emostream supervisor page: every live call of `emostream serve`, from /v1/events.
 *
 * Plain JavaScript, no framework, no build step, nothing loaded from anywhere but the server (the
 * server's Content-Security-Policy forbids anything else, inline scripts and style attributes
 * included). All text from the server (call ids, channel names, info) goes into the page through
 * textContent / setAttribute, never as HTML.
 *
 * Auth: the token lives in sessionStorage only (this tab), goes out as an Authorization header, and
 * the websocket, which cannot carry headers, gets a short-lived ticket from GET /v1/ticket first.
 * When the socket drops, a banner says so and the page retries with exponential backoff (1 s
 * doubling to 30 s, with jitter), then rebuilds its state from `hello` + GET /v1/calls. A request
 * or socket left unanswered for 10 s counts as a lost connection.
 */
'use strict';

(function () {
  const CLASSES = ['Angry', 'Disgusted', 'Fearful', 'Happy', 'Neutral', 'Sad', 'Surprised'];
  // Same hex values as emostream.dashboard.EMOTION_COLORS (the CSS classes .e-<Label> use them).
  const EMOTION_COLORS = {
    Angry: '#e53935', Disgusted: '#8d9a2a', Fearful: '#b05bd6', Happy: '#f4c430',
    Neutral: '#a8a8a8', Sad: '#3a7bd5', Surprised: '#26c6da',
  };
  const TOKEN_KEY = 'emostream.token';
  const STRIP_CELLS = 120;          // windows shown per channel on a card (2 min at a 1 s hop)
  const ENDED_KEEP_MS = 60000;      // ended calls stay, greyed out, this long
  const BACKOFF_MAX_S = 30;
  // A request or a socket that gets no answer is given up after this long and retried as a lost
  // connection (a load balancer or a front end that accepts the TCP connection and then hangs).
  const ANSWER_TIMEOUT_MS = 10000;
  const HISTORY_CONCURRENCY = 4;    // parallel GET /v1/calls/<id> when (re)building the state
  const DETAIL_RENDER_MS = 500;     // the open timeline redraws at most this often

  class AuthError extends Error {}
  class HttpError extends Error {
    constructor(status) { super('HTTP ' + status); this.status = status; }
  }

  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function emotionClass(label) {
    if (label === null || label === undefined) return 'e-silence';
    return CLASSES.includes(label) ? 'e-' + label : 'e-unknown';
  }

  function fmtClock(seconds) {
    const total = Math.max(0, Math.floor(Number(seconds) || 0));
    const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
    const ss = String(s).padStart(2, '0');
    return h ? h + ':' + String(m).padStart(2, '0') + ':' + ss : m + ':' + ss;
  }

  function fmtPct(p) {
    return (p === null || p === undefined) ? '' : Math.round(Number(p) * 100) + ' %';
  }

  function num(x, fallback) {
    const v = Number(x);
    return Number.isFinite(v) ? v : fallback;
  }

  // ------------------------------------------------------------------ state

  const state = {
    token: null,
    calls: new Map(),      // call id -> call (see newCall)
    ws: null,
    generation: 0,         // bumps on every connect attempt; stale async work checks it
    attempt: 0,            // failed attempts since the last good connection
    retryAt: 0,            // Date.now() of the next attempt (0 = none planned)
    retryTimer: null,
    helloTimer: null,      // gives up a socket that sends no hello within ANSWER_TIMEOUT_MS
    connected: false,
    everConnected: false,
    skewMs: 0,             // browser clock minus server clock, when they differ by more than 2 s
    device: null,
    detail: null,          // the open full timeline (see openDetail)
  };

  function serverNowS() { return (Date.now() - state.skewMs) / 1000; }

  function noteSkew(response) {
    const date = response.headers.get('Date');
    if (!date) return;
    const serverMs = Date.parse(date);
    if (!Number.isFinite(serverMs)) return;
    const skew = Date.now() - serverMs;  // the header has 1 s resolution: ignore small differences
    state.skewMs = Math.abs(skew) > 2000 ? skew : 0;
  }

  // ------------------------------------------------------------------ HTTP

  async function api(path, timeoutMs = 3 * ANSWER_TIMEOUT_MS) {
    const headers = { Accept: 'application/json' };
    if (state.token) headers.Authorization = 'Bearer ' + state.token;
    const response = await fetch(path, {
      headers, cache: 'no-store', credentials: 'omit', signal: AbortSignal.timeout(timeoutMs),
    });
    noteSkew(response);
    if (response.status === 401) throw new AuthError('unauthorized');
    if (!response.ok) throw new HttpError(response.status);
    return response.json();
  }

  function eventsUrl(ticket) {
    const url = new URL('v1/events', window.location.href);
    url.protocol = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = '?ticket=' + encodeURIComponent(ticket);
    url.hash = '';
    return url.href;
  }

  // ------------------------------------------------------------------ connection

  async function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    state.retryAt = 0;
    closeSocket();
    const generation = ++state.generation;
    if (state.everConnected) setBanner('Connection lost — reconnecting…');
    setConn('connecting…', 'conn-off');
    let ticket;
    try {
      const body = await api('v1/ticket', ANSWER_TIMEOUT_MS);
      ticket = body && body.ticket;
      if (typeof ticket !== 'string' || !ticket) throw new Error('no ticket in the answer');
    } catch (err) {
      if (generation !== state.generation) return;
      if (err instanceof AuthError) {
        needLogin(state.token ? 'The server did not accept this token.' : '');
      } else {
        connectionLost();
      }
      return;
    }
    if (generation !== state.generation) return;
    showMain();
    let ws;
    try {
      ws = new WebSocket(eventsUrl(ticket));
    } catch (err) {
      connectionLost();
      return;
    }
    state.ws = ws;
    state.helloTimer = setTimeout(() => {
      if (state.ws !== ws || state.connected) return;
      closeSocket();
      connectionLost();
    }, ANSWER_TIMEOUT_MS);
    ws.onmessage = (e) => {
      if (state.ws !== ws || typeof e.data !== 'string') return;
      let message;
      try { message = JSON.parse(e.data); } catch (err) { return; }
      if (message && typeof message === 'object') onMessage(message, generation);
    };
    ws.onclose = () => {
      if (state.ws !== ws) return;
      state.ws = null;
      connectionLost();
    };
  }

  function closeSocket() {
    const ws = state.ws;
    state.ws = null;
    state.connected = false;
    clearTimeout(state.helloTimer);
    state.helloTimer = null;
    if (ws) {
      ws.onmessage = null;
      ws.onclose = null;
      try { ws.close(1000, 'bye'); } catch (err) { /* already closed */ }
    }
  }

  function connectionLost() {
    state.connected = false;
    document.body.classList.add('offline');
    const base = Math.min(BACKOFF_MAX_S, Math.pow(2, state.attempt));
    const delay = Math.min(BACKOFF_MAX_S, base * (0.75 + Math.random() * 0.5));  // ±25 % jitter
    state.attempt += 1;
    state.retryAt = Date.now() + delay * 1000;
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(connect, delay * 1000);
    setConn('disconnected', 'conn-off');
    updateBanner();
  }

  function updateBanner() {
    if (!state.retryAt) return;
    const left = Math.max(1, Math.ceil((state.retryAt - Date.now()) / 1000));
    const what = state.everConnected ? 'Connection lost' : 'Cannot reach the server';
    setBanner(what + ' — reconnecting in ' + left + ' s');
  }

  function setBanner(text) {
    const banner = $('conn-banner');
    if (text) {
      $('conn-banner-text').textContent = text;
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  }

  function setConn(text, cls) {
    const node = $('conn');
    node.textContent = text;
    node.className = 'conn ' + cls;
  }

  // ------------------------------------------------------------------ login

  function needLogin(message) {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    state.retryAt = 0;
    state.generation += 1;
    closeSocket();
    setBanner(null);
    if (message) {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
    }
    setConn('signed out', 'conn-off');
    $('main').hidden = true;
    $('logout').hidden = true;
    closeDetail();
    $('login').hidden = false;
    const error = $('login-error');
    error.textContent = message || '';
    error.hidden = !message;
    $('token-input').focus();
  }

  function showMain() {
    $('login').hidden = true;
    $('main').hidden = false;
    $('logout').hidden = !state.token;
  }

  function onLogin(e) {
    e.preventDefault();
    const input = $('token-input');
    const token = input.value.trim();
    if (!token) return;
    input.value = '';
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $('login-error').hidden = true;
    state.attempt = 0;
    connect();
  }

  function onLogout() {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    for (const id of [...state.calls.keys()]) removeCall(id);
    state.everConnected = false;
    needLogin('');
  }

  // ------------------------------------------------------------------ messages

  function onMessage(m, generation) {
    switch (m.type) {
      case 'hello': onHello(m, generation); break;
      case 'call_started': upsertCall(m); break;
      case 'event': onEvent(m); break;
      case 'alert': onAlert(m); break;
      case 'summary': onSummary(m); break;
      case 'call_ended': {
        const call = state.calls.get(String(m.call_id));
        if (call) endCall(call, m.reason, Date.now());
        break;
      }
      default: break;  // unknown types: newer servers may add some
    }
  }

  async function onHello(m, generation) {
    clearTimeout(state.helloTimer);
    state.helloTimer = null;
    state.connected = true;
    state.everConnected = true;
    state.attempt = 0;
    state.retryAt = 0;
    state.device = m.device || null;
    document.body.classList.remove('offline');
    setBanner(null);
    setConn('live' + (state.device ? ' · model on ' + state.device : ''), 'conn-on');
    const known = new Set();
    for (const c of Array.isArray(m.calls) ? m.calls : []) {
      const call = upsertCall(c);
      if (call) known.add(call.id);
    }
    let list = null;
    try {
      const body = await api('v1/calls');
      list = Array.isArray(body.calls) ? body.calls : [];
    } catch (err) {
      if (generation !== state.generation) return;
      if (err instanceof AuthError) { needLogin('The server did not accept this token.'); return; }
    }
    if (generation !== state.generation) return;
    if (list !== null) {
      // a call id can be listed twice (ended, then started again within the minute): the live one wins
      const byId = new Map();
      for (const c of list) {
        if (!c || c.call_id === undefined || c.call_id === null) continue;
        const id = String(c.call_id);
        const ended = c.ended_at !== null && c.ended_at !== undefined;
        if (!byId.has(id) || !ended) byId.set(id, c);
      }
      for (const c of byId.values()) {
        const call = upsertCall(c);
        if (!call) continue;
        known.add(call.id);
        if (c.ended_at !== null && c.ended_at !== undefined) {
          endCall(call, c.end_reason, num(c.ended_at, serverNowS()) * 1000 + state.skewMs);
        }
      }
      // Calls this page showed that the server does not know (it restarted): they are over.
      for (const call of state.calls.values()) {
        if (!known.has(call.id) && call.endedAt === null) endCall(call, 'no longer on the server', Date.now());
      }
    }
    loadHistories([...known], generation);
  }

  async function loadHistories(ids, generation) {
    const queue = ids.slice();
    async function worker() {
      while (queue.length && generation === state.generation) {
        const call = state.calls.get(queue.shift());
        if (call) await loadHistory(call, generation);
      }
    }
    const workers = [];
    for (let i = 0; i < HISTORY_CONCURRENCY; i++) workers.push(worker());
    await Promise.all(workers);
  }

  async function loadHistory(call, generation) {
    let data;
    try {
      data = await api('v1/calls/' + encodeURIComponent(call.id));
    } catch (err) {
      return;  // 404: ended and forgotten meanwhile; anything else: the live feed still works
    }
    if (generation !== state.generation || state.calls.get(call.id) !== call || !data) return;
    if (data.call && num(data.call.started_at, call.startedAt) !== call.startedAt) return;  // another call, same id
    const events = Array.isArray(data.events) ? data.events : [];
    for (const name of new Set(events.map((e) => String(e.channel)))) ensureChannel(call, name);
    for (const [name, ch] of call.ch) {
      const past = events.filter((e) => String(e.channel) === name).slice(-STRIP_CELLS);
      const lastPast = past.length ? num(past[past.length - 1].t_end, 0) : -Infinity;
      const newer = ch.events.filter((e) => e.t_end > lastPast + 1e-6);
      ch.events = past.map(slimEvent).concat(newer).slice(-STRIP_CELLS);
      ch.lastEnd = ch.events.length ? ch.events[ch.events.length - 1].t_end : -Infinity;
      rebuildStrip(call, name);
      renderCurrent(call, name);
    }
    for (const a of Array.isArray(data.alerts) ? data.alerts : []) applyAlert(call, a);
    if (data.summary) call.summary = data.summary;
    renderAlerts(call);
    updateOrder(call);
  }

  // ------------------------------------------------------------------ calls

  function newCall(m) {
    return {
      id: String(m.call_id),
      protocol: '', channels: [], analysed: null, hop: 1, startedAt: 0, info: {},
      endedAt: null, endReason: null, summary: null, audioEnd: 0,
      ch: new Map(),          // channel -> {events, lastEnd, alerts: Map rule -> {state, t, since, label}}
      dom: null,
    };
  }

  function upsertCall(m) {
    if (m === null || typeof m !== 'object' || m.call_id === undefined || m.call_id === null) return null;
    const id = String(m.call_id);
    const startedAt = num(m.started_at, serverNowS());
    let call = state.calls.get(id);
    if (call && Math.abs(call.startedAt - startedAt) > 1e-3 && m.type === 'call_started') {
      removeCall(id);  // the same id started again: a new call
      call = null;
    }
    if (!call) {
      call = newCall(m);
      state.calls.set(id, call);
      call.dom = buildCard(call);
      $('calls').appendChild(call.dom.card);
    }
    call.startedAt = startedAt;
    call.protocol = m.protocol ? String(m.protocol) : call.protocol;
    call.hop = num(m.hop_seconds, call.hop) || 1;
    call.info = (m.info && typeof m.info === 'object') ? m.info : call.info;
    if (Array.isArray(m.channels)) call.channels = m.channels.map(String);
    if (Array.isArray(m.analysed)) call.analysed = new Set(m.analysed.map(String));
    for (const name of call.channels) ensureChannel(call, name);
    renderHeader(call);
    updateOrder(call);
    updateCounts();
    return call;
  }

  function isAnalysed(call, name) {
    return call.analysed === null || call.analysed.has(name);
  }

  function ensureChannel(call, name) {
    if (call.ch.has(name)) return call.ch.get(name);
    const ch = { events: [], lastEnd: -Infinity, alerts: new Map() };
    call.ch.set(name, ch);
    if (!call.channels.includes(name)) call.channels.push(name);
    buildChannelRow(call, name);
    return ch;
  }

  function slimEvent(e) {
    return {
      t_start: num(e.t_start, 0), t_end: num(e.t_end, 0), speech: Boolean(e.speech),
      label: e.speech && e.label !== undefined && e.label !== null ? String(e.label) : null,
      confidence: e.speech ? num(e.confidence, null) : null,
    };
  }

  function onEvent(m) {
    const call = state.calls.get(String(m.stream !== undefined ? m.stream : m.call_id));
    if (!call) return;
    const name = String(m.channel);
    const ch = ensureChannel(call, name);
    const e = slimEvent(m);
    call.audioEnd = Math.max(call.audioEnd, e.t_end);
    if (state.detail && state.detail.id === call.id) detailAddEvent(name, m);
    if (e.t_end <= ch.lastEnd + 1e-6) return;  // already shown (history and live feed overlap)
    ch.lastEnd = e.t_end;
    ch.events.push(e);
    const row = call.dom.rows.get(name);
    row.strip.appendChild(stripCell(e));
    if (ch.events.length > STRIP_CELLS) {
      ch.events.splice(0, ch.events.length - STRIP_CELLS);
      while (row.strip.childElementCount > STRIP_CELLS) row.strip.firstElementChild.remove();
    }
    renderCurrent(call, name);
  }

  function onAlert(m) {
    const call = state.calls.get(String(m.call_id !== undefined ? m.call_id : m.stream));
    if (!call) return;
    applyAlert(call, m);
    renderAlerts(call);
    updateOrder(call);
    updateCounts();
    if (state.detail && state.detail.id === call.id) {
      state.detail.alerts.push(m);
      scheduleDetailRender();
    }
  }

  function applyAlert(call, a) {
    if (!a || a.rule === undefined) return;
    const ch = ensureChannel(call, String(a.channel));
    const rule = String(a.rule);
    const t = num(a.t, 0);
    const prev = ch.alerts.get(rule);
    if (prev && t < prev.t) return;  // older news (history and live feed overlap)
    ch.alerts.set(rule, { state: String(a.state), t, since: num(a.since, null), label: a.label });
  }

  function activeAlerts(call) {
    const out = [];
    for (const [name, ch] of call.ch) {
      for (const [rule, a] of ch.alerts) if (a.state === 'raised') out.push({ channel: name, rule, a });
    }
    return out;
  }

  function onSummary(m) {
    const call = state.calls.get(String(m.call_id !== undefined ? m.call_id : m.stream));
    if (!call) return;
    call.summary = m;
    if (state.detail && state.detail.id === call.id) {
      state.detail.summary = m;
      scheduleDetailRender();
    }
  }

  function endCall(call, reason, endedAtMs) {
    if (call.endedAt !== null) return;
    call.endedAt = endedAtMs;
    call.endReason = reason ? String(reason) : 'ended';
    // an ended call has no running alerts any more
    for (const ch of call.ch.values()) {
      for (const a of ch.alerts.values()) if (a.state === 'raised') a.state = 'ended';
    }
    call.dom.card.classList.add('ended');
    renderHeader(call);
    renderAlerts(call);
    updateOrder(call);
    updateCounts();
    if (state.detail && state.detail.id === call.id) scheduleDetailRender();
  }

  function removeCall(id) {
    const call = state.calls.get(id);
    if (!call) return;
    state.calls.delete(id);
    call.dom.card.remove();
    updateCounts();
  }

  function durationS(call) {
    const end = call.endedAt !== null ? (call.endedAt - state.skewMs) / 1000 : serverNowS();
    // --fast senders stream faster than real time: never show less than the audio analysed so far
    return Math.max(0, end - call.startedAt, call.audioEnd);
  }

  // ------------------------------------------------------------------ cards

  function buildCard(call) {
    const card = el('article', 'card');
    card.dataset.callId = call.id;
    card.tabIndex = 0;
    card.setAttribute('role', 'button');
    card.setAttribute('aria-label', 'call ' + call.id + ': open the full timeline');
    const head = el('div', 'card-head');
    const title = el('h3', 'call-id', call.id);
    title.title = call.id;
    const proto = el('span', 'proto');
    const dur = el('span', 'duration');
    const status = el('span', 'status');
    head.append(title, proto, dur, status);
    const alerts = el('div', 'alerts');
    const rows = el('div', 'rows');
    card.append(head, alerts, rows);
    card.addEventListener('click', () => openDetail(call.id));
    card.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); openDetail(call.id); }
    });
    return { card, proto, dur, status, alerts, rowsBox: rows, rows: new Map() };
  }

  function buildChannelRow(call, name) {
    const row = el('div', 'channel');
    row.dataset.channel = name;
    const chName = el('span', 'ch-name', name);
    chName.title = name;
    const label = el('span', 'label');
    const conf = el('span', 'conf');
    const barBox = el('span', 'bar');
    const bar = el('span', 'bar-fill');
    barBox.appendChild(bar);
    const strip = el('div', 'strip');
    row.append(chName, label, conf, barBox, strip);
    call.dom.rowsBox.appendChild(row);
    call.dom.rows.set(name, { row, label, conf, bar, strip });
    renderCurrent(call, name);
  }

  function stripCell(e) {
    const cell = el('span', 'cell ' + emotionClass(e.label));
    cell.title = fmtClock(e.t_end) + ' ' + (e.speech ? (e.label || '?') + ' ' + fmtPct(e.confidence) : 'silence');
    return cell;
  }

  function rebuildStrip(call, name) {
    const row = call.dom.rows.get(name);
    const ch = call.ch.get(name);
    row.strip.replaceChildren(...ch.events.map(stripCell));
  }

  function renderCurrent(call, name) {
    const row = call.dom.rows.get(name);
    const ch = call.ch.get(name);
    if (!row || !ch) return;
    row.row.classList.toggle('not-analysed', !isAnalysed(call, name));
    if (!isAnalysed(call, name) && !ch.events.length) {
      row.label.textContent = 'not analysed (privacy)';
      row.label.className = 'label muted';
      row.conf.textContent = '';
      row.bar.style.width = '0%';
      return;
    }
    const e = ch.events.length ? ch.events[ch.events.length - 1] : null;
    let text, cls;
    if (!e) { text = 'waiting…'; cls = 'label muted'; }
    else if (!e.speech) { text = 'silence'; cls = 'label muted'; }
    else { text = e.label || '?'; cls = 'label ' + emotionClass(e.label).replace('e-', 't-'); }
    row.label.textContent = text;
    row.label.className = cls;
    row.conf.textContent = e && e.speech ? fmtPct(e.confidence) : '';
    row.bar.className = 'bar-fill ' + (e && e.speech ? emotionClass(e.label) : 'e-silence');
    row.bar.style.width = (e && e.speech ? Math.round(100 * Math.min(1, Math.max(0, e.confidence || 0))) : 0) + '%';
  }

  function renderHeader(call) {
    const d = call.dom;
    d.proto.textContent = call.protocol || '?';
    d.status.textContent = call.endedAt !== null ? 'ended · ' + call.endReason : 'live';
    d.status.className = 'status ' + (call.endedAt !== null ? 'st-ended' : 'st-live');
    d.dur.textContent = fmtClock(durationS(call));
    for (const name of call.ch.keys()) renderCurrent(call, name);
  }

  function renderAlerts(call) {
    const d = call.dom;
    const active = activeAlerts(call);
    d.alerts.replaceChildren(...active.map(({ channel, rule }) => {
      const badge = el('span', 'alert-badge', '⚠ ' + channel + ': ' + rule);
      badge.title = 'alert raised on ' + channel + ': ' + rule;
      return badge;
    }));
    d.card.classList.toggle('alerting', active.length > 0);
    for (const [name, row] of d.rows) {
      row.row.classList.toggle('alerting', active.some((x) => x.channel === name));
    }
  }

  function updateOrder(call) {
    // CSS grid order: calls with a raised alert first, then live calls (in arrival order), then ended
    const rank = call.endedAt !== null ? 2 : (activeAlerts(call).length ? 0 : 1);
    call.dom.card.style.order = String(rank);
  }

  function updateCounts() {
    let live = 0, ended = 0, alerting = 0;
    for (const call of state.calls.values()) {
      if (call.endedAt !== null) ended += 1; else live += 1;
      if (call.endedAt === null && activeAlerts(call).length) alerting += 1;
    }
    const parts = [live + (live === 1 ? ' live call' : ' live calls')];
    if (alerting) parts.push(alerting + ' with alerts');
    if (ended) parts.push(ended + ' ended');
    $('counts').textContent = parts.join(' · ');
    $('counts').classList.toggle('has-alerts', alerting > 0);
    $('empty').hidden = state.calls.size > 0;
    document.title = (alerting ? '⚠ ' + alerting + ' · ' : '') + 'emostream · live calls';
  }

  function tick() {
    const now = Date.now();
    for (const call of [...state.calls.values()]) {
      if (call.endedAt !== null && now - call.endedAt >= ENDED_KEEP_MS) {
        removeCall(call.id);
        continue;
      }
      call.dom.dur.textContent = fmtClock(durationS(call));
    }
    if (state.retryAt) updateBanner();
    if (state.detail) $('detail-meta').textContent = detailMeta(state.detail.id);
  }

  function buildLegend() {
    const legend = $('legend');
    for (const c of CLASSES) {
      const item = el('span', 'legend-item');
      item.append(el('span', 'swatch ' + emotionClass(c)), document.createTextNode(c));
      legend.appendChild(item);
    }
    const silence = el('span', 'legend-item');
    silence.append(el('span', 'swatch e-silence'), document.createTextNode('silence'));
    const alert = el('span', 'legend-item');
    alert.append(el('span', 'swatch swatch-alert'), document.createTextNode('alert raised'));
    legend.append(silence, alert);
  }

  // ------------------------------------------------------------------ full timeline of one call

  function detailMeta(id) {
    const call = state.calls.get(id);
    if (!call) return '';
    const started = call.startedAt ? new Date(call.startedAt * 1000 + state.skewMs).toLocaleTimeString() : '?';
    return [call.protocol, 'started ' + started, fmtClock(durationS(call)),
      call.endedAt !== null ? 'ended · ' + call.endReason : 'live'].join(' · ');
  }

  async function openDetail(id) {
    const call = state.calls.get(id);
    if (!call) return;
    const detail = { id, events: new Map(), alerts: [], summary: call.summary, loaded: false, timer: null };
    state.detail = detail;
    $('detail-title').textContent = id;
    $('detail-meta').textContent = detailMeta(id);
    $('detail-note').textContent = 'Loading the timeline…';
    $('detail-body').replaceChildren();
    $('detail-alerts').replaceChildren();
    $('detail-summary').replaceChildren();
    $('detail-info').replaceChildren();
    $('detail').hidden = false;
    $('detail-close').focus();
    let data = null;
    try {
      data = await api('v1/calls/' + encodeURIComponent(id));
    } catch (err) {
      if (state.detail !== detail) return;
      if (err instanceof AuthError) { needLogin('The server did not accept this token.'); return; }
      const why = err instanceof HttpError && err.status === 404 ? 'The server no longer has this call' : 'The timeline could not be loaded';
      $('detail-note').textContent = why + '; showing the recent windows this page has.';
      for (const [name, ch] of call.ch) detail.events.set(name, ch.events.slice());
      detail.loaded = true;
      renderDetail();
      return;
    }
    if (state.detail !== detail) return;
    // the history, then whatever the live feed brought while the request ran (newer windows only)
    const pending = detail.events;
    detail.events = new Map();
    for (const name of call.channels) detail.events.set(name, []);
    for (const e of Array.isArray(data.events) ? data.events : []) {
      const name = String(e.channel);
      if (!detail.events.has(name)) detail.events.set(name, []);
      detail.events.get(name).push(detailEvent(e));
    }
    for (const [name, list] of detail.events) list.sort((a, b) => a.t_end - b.t_end);
    for (const [name, extra] of pending) {
      if (!detail.events.has(name)) detail.events.set(name, []);
      const list = detail.events.get(name);
      const last = list.length ? list[list.length - 1].t_end : -Infinity;
      for (const e of extra) if (e.t_end > last + 1e-6) list.push(e);
    }
    detail.alerts = (Array.isArray(data.alerts) ? data.alerts : []).concat(detail.alerts);
    if (data.summary) detail.summary = data.summary;
    detail.loaded = true;
    $('detail-note').textContent = '';
    renderDetail();
  }

  function detailEvent(e) {
    const item = slimEvent(e);
    item.probabilities = e.speech && e.probabilities && typeof e.probabilities === 'object' ? e.probabilities : null;
    return item;
  }

  function detailAddEvent(name, e) {
    const detail = state.detail;
    if (!detail.events.has(name)) detail.events.set(name, []);
    const list = detail.events.get(name);
    const item = detailEvent(e);
    if (list.length && item.t_end <= list[list.length - 1].t_end + 1e-6) return;  // already there
    list.push(item);
    if (detail.loaded) scheduleDetailRender();
  }

  function scheduleDetailRender() {
    const detail = state.detail;
    if (!detail || !detail.loaded || detail.timer) return;
    // a long call's timeline has thousands of cells: redraw it less often
    let cells = 0;
    for (const list of detail.events.values()) cells += list.length;
    detail.timer = setTimeout(() => { detail.timer = null; if (state.detail === detail) renderDetail(); },
      DETAIL_RENDER_MS + 0.2 * cells);
  }

  function tickStep(duration) {
    for (const step of [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200]) {
      if (duration / step <= 10) return step;
    }
    return 14400;
  }

  function renderDetail() {
    const detail = state.detail;
    const call = state.calls.get(detail.id);
    const hop = call ? call.hop : 1;
    let duration = 1;
    for (const list of detail.events.values()) {
      if (list.length) duration = Math.max(duration, list[list.length - 1].t_end);
    }
    const pct = (t) => (100 * Math.min(1, Math.max(0, t / duration))) + '%';
    const body = $('detail-body');
    const blocks = [];
    const names = call ? call.channels.slice() : [];
    for (const name of detail.events.keys()) if (!names.includes(name)) names.push(name);
    for (const name of names) {
      const list = detail.events.get(name) || [];
      const block = el('section', 'tl-channel');
      block.dataset.channel = name;
      const title = el('h4', null, name);
      block.appendChild(title);
      if (call && !isAnalysed(call, name) && !list.length) {
        block.appendChild(el('p', 'muted', 'not analysed (privacy): no emotion events for this channel'));
        blocks.push(block);
        continue;
      }
      const speech = list.filter((e) => e.speech).length;
      title.appendChild(el('span', 'muted', ' · ' + list.length + ' windows, ' + speech + ' with speech'));
      const tl = el('div', 'tl');
      tl.dataset.channel = name;
      let prevEnd = 0;
      list.forEach((e, i) => {
        const start = Math.max(prevEnd, e.t_end - hop, 0);
        prevEnd = e.t_end;
        const cell = el('span', 'cell ' + emotionClass(e.label));
        cell.dataset.i = String(i);
        cell.style.left = pct(start);
        cell.style.width = 'calc(' + pct(Math.max(e.t_end - start, 0)) + ' + 0.5px)';
        cell.title = describe(name, e);
        tl.appendChild(cell);
      });
      // alert spans: raised → cleared (or still running)
      const spans = alertSpans(detail.alerts.filter((a) => String(a.channel) === name), call);
      for (const s of spans) {
        const mark = el('span', 'tl-alert' + (s.open ? ' open' : ''));
        mark.style.left = pct(s.from);
        mark.style.width = pct(Math.max(0, s.to - s.from));
        mark.title = s.rule + ': raised at ' + fmtClock(s.from) + (s.open ? ', still raised' : ', cleared at ' + fmtClock(s.to));
        tl.appendChild(mark);
      }
      tl.addEventListener('mouseover', (ev) => {
        const cell = ev.target.closest('.cell');
        if (!cell || !tl.contains(cell)) return;
        const e = list[Number(cell.dataset.i)];
        if (e) $('detail-hover').textContent = describe(name, e, true);
      });
      block.appendChild(tl);
      const axis = el('div', 'axis');
      const step = tickStep(duration);
      for (let t = 0; t <= duration + 1e-6; t += step) {
        const tick = el('span', 'tick', fmtClock(t));
        tick.style.left = pct(t);
        axis.appendChild(tick);
      }
      block.appendChild(axis);
      blocks.push(block);
    }
    body.replaceChildren(...blocks);
    renderDetailAlerts(detail);
    renderDetailSummary(detail);
    renderDetailInfo(call);
    $('detail-meta').textContent = detailMeta(detail.id);
  }

  function describe(name, e, full) {
    const when = fmtClock(e.t_start) + '–' + fmtClock(e.t_end);
    if (!e.speech) return name + ' · ' + when + ' · silence (not classified)';
    let text = name + ' · ' + when + ' · ' + (e.label || '?') + ' ' + fmtPct(e.confidence);
    if (full && e.probabilities) {
      const others = Object.entries(e.probabilities)
        .filter(([k]) => k !== e.label).sort((a, b) => b[1] - a[1]).slice(0, 3)
        .map(([k, v]) => k + ' ' + fmtPct(v));
      if (others.length) text += ' (then ' + others.join(', ') + ')';
    }
    return text;
  }

  function alertSpans(alerts, call) {
    const open = new Map();
    const spans = [];
    const sorted = alerts.slice().sort((a, b) => num(a.t, 0) - num(b.t, 0));
    for (const a of sorted) {
      const rule = String(a.rule);
      if (a.state === 'raised') {
        if (!open.has(rule)) open.set(rule, num(a.t, 0));
      } else if (open.has(rule)) {
        spans.push({ rule, from: open.get(rule), to: num(a.t, 0), open: false });
        open.delete(rule);
      }
    }
    let end = 0;
    if (call) for (const ch of call.ch.values()) end = Math.max(end, ch.lastEnd);
    for (const [rule, from] of open) spans.push({ rule, from, to: Math.max(end, from), open: !(call && call.endedAt !== null) });
    return spans;
  }

  function renderDetailAlerts(detail) {
    const box = $('detail-alerts');
    if (!detail.alerts.length) { box.replaceChildren(); return; }
    const seen = new Set();
    const items = [];
    const sorted = detail.alerts.slice().sort((a, b) => num(a.t, 0) - num(b.t, 0));
    for (const a of sorted) {
      const key = [a.channel, a.rule, a.state, a.t].join('\u0000');
      if (seen.has(key)) continue;
      seen.add(key);
      items.push(el('li', a.state === 'raised' ? 'raised' : 'cleared',
        fmtClock(num(a.t, 0)) + ' · ' + a.channel + ' · ' + a.rule + ' · ' + a.state));
    }
    const list = el('ul', 'alert-list');
    list.append(...items);
    box.replaceChildren(el('h4', null, 'Alerts'), list);
  }

  function renderDetailSummary(detail) {
    const box = $('detail-summary');
    const summary = detail.summary;
    if (!summary || typeof summary.channels !== 'object' || summary.channels === null) { box.replaceChildren(); return; }
    const parts = [el('h4', null, 'Summary · ' + fmtClock(num(summary.duration, 0)) + ' of audio' +
      (summary.end_reason ? ' · ' + summary.end_reason : ''))];
    for (const [name, s] of Object.entries(summary.channels)) {
      const row = el('div', 'sum-row');
      row.dataset.channel = name;
      const head = el('div', 'sum-head');
      head.append(el('strong', null, name), el('span', 'muted',
        ' · ' + num(s.windows, 0) + ' windows · ' + Math.round(num(s.speech_seconds, 0)) + ' s of speech · dominant: '));
      const dom = el('span', s.dominant ? 't-' + (CLASSES.includes(s.dominant) ? s.dominant : 'unknown') : 'muted', s.dominant || 'no speech');
      head.appendChild(dom);
      row.appendChild(head);
      const shares = s.shares && typeof s.shares === 'object' ? s.shares : {};
      const bar = el('div', 'shares');
      for (const c of CLASSES) {
        const v = num(shares[c], 0);
        if (v <= 0) continue;
        const part = el('span', 'share ' + emotionClass(c));
        part.style.width = (100 * v) + '%';
        part.title = c + ' ' + fmtPct(v) + ' of speech time';
        bar.appendChild(part);
      }
      row.appendChild(bar);
      const text = CLASSES.filter((c) => num(shares[c], 0) > 0).map((c) => c + ' ' + fmtPct(shares[c])).join(' · ');
      if (text) row.appendChild(el('div', 'muted small', text));
      if (Array.isArray(s.peaks) && s.peaks.length) {
        row.appendChild(el('div', 'small', 'Strongest moments: ' + s.peaks.map((p) =>
          p.label + ' ' + fmtPct(p.confidence) + ' at ' + fmtClock(num(p.t_start, 0))).join(', ')));
      }
      parts.push(row);
    }
    box.replaceChildren(...parts);
  }

  function renderDetailInfo(call) {
    const box = $('detail-info');
    const info = call && call.info && typeof call.info === 'object' ? Object.entries(call.info) : [];
    if (!info.length) { box.replaceChildren(); return; }
    const dl = el('dl', 'info');
    for (const [k, v] of info) {
      dl.append(el('dt', null, k), el('dd', null, typeof v === 'object' ? JSON.stringify(v) : String(v)));
    }
    box.replaceChildren(el('h4', null, 'Call information'), dl);
  }

  function closeDetail() {
    if (state.detail && state.detail.timer) clearTimeout(state.detail.timer);
    state.detail = null;
    $('detail').hidden = true;
  }

  // ------------------------------------------------------------------ start

  function start() {
    // A token in the address (an old ?token= link) is taken over and removed from the URL at once.
    const params = new URLSearchParams(window.location.search);
    if (params.has('token')) {
      const token = params.get('token');
      params.delete('token');
      const query = params.toString();
      window.history.replaceState(null, '', window.location.pathname + (query ? '?' + query : '') + window.location.hash);
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
    }
    state.token = sessionStorage.getItem(TOKEN_KEY);
    buildLegend();
    updateCounts();
    $('login-form').addEventListener('submit', onLogin);
    $('logout').addEventListener('click', onLogout);
    $('retry-now').addEventListener('click', () => { connect(); });
    $('detail-close').addEventListener('click', closeDetail);
    $('detail').addEventListener('click', (e) => { if (e.target === $('detail')) closeDetail(); });
    document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && state.detail) closeDetail(); });
    setInterval(tick, 1000);
    connect();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();

  // for the console: window.emostream.state
  window.emostream = { state, EMOTION_COLORS };
})();
