// Every word the page shows, in Japanese (the default) and English.
//
// Elements carry data-i18n="key" (text) or data-i18n-attr="attr:key;attr:key"; applyLanguage()
// fills them. Text set from code goes through t(key, vars), where {name} is replaced by vars.name.

const MESSAGES = {
  ja: {
    "page.title": "J-Moshi — 日本語で話せる AI",
    "page.tagline": "日本語で、同時に話して聞ける音声対話",
    "lang.label": "表示言語",
    "start": "開始",
    "stop": "停止",
    "start.hint": "開始を押すとマイクが有効になります",
    "headphones.title": "ヘッドホンかイヤホンを使ってください",
    "headphones.body":
      "スピーカーから出た J-Moshi の声をマイクが拾うと、J-Moshi が自分の声に反応してしまいます。",
    "headphones.dismiss": "わかりました",
    "meter.you": "あなた",
    "meter.model": "J-Moshi",
    "transcript.title": "J-Moshi の発話",
    "transcript.empty": "J-Moshi の言葉がここに表示されます。",
    "transcript.reconnected": "（再接続しました）",
    "transcript.newConversation": "― 新しい会話 ―",
    "settings.title": "設定",
    "settings.hint":
      "空欄ならサーバーの既定値を使います。温度を上げると応答が多様に、下げると安定します。" +
      "シードを決めると同じ条件で同じ応答になりやすくなります。次の「開始」から反映されます。",
    "settings.text_temperature": "テキストの温度",
    "settings.text_topk": "テキストの top-k",
    "settings.audio_temperature": "音声の温度",
    "settings.audio_topk": "音声の top-k",
    "settings.seed": "シード",
    "settings.default": "既定",
    "settings.random": "毎回ランダム",
    "settings.reset": "既定に戻す",
    "settings.saved": "この端末に保存しました。",
    "settings.invalid": "{min} から {max} の数を入力してください。",
    "settings.invalidInt": "{min} から {max} の整数を入力してください。",
    "settings.inForce": "この会話の設定",
    "stats.show": "統計を表示",
    "stats.hide": "統計を隠す",
    "stats.title": "統計",
    "stats.latency": "遅延（推定）",
    "stats.buffered": "再生バッファ",
    "stats.droppedPlayer": "破棄した音声（再生側）",
    "stats.droppedServer": "破棄した音声（サーバー側）",
    "stats.underruns": "音の途切れ",
    "stats.step": "サーバーの処理時間（1 フレーム p50）",
    "stats.stepDetail": "{total} ms（LM {lm} ms）",
    "stats.model": "モデル",
    "stats.none": "—",
    "stats.slowServer":
      "サーバーの処理が 1 フレーム（80 ms）より遅く、音声が途切れたり遅れたりします。より速い GPU が必要です。",
    "stats.times": "{n} 回",
    "stats.stepP95": "{total} ms（p95 {p95} ms・LM {lm} ms）",
    "stats.droppedDetail": "{ms} ms（{n} フレーム）",
    "record.label": "この会話を録音する",
    "record.note":
      "録音すると、会話が終わったあとにダウンロードできるよう、サーバーがあなたの声と J-Moshi の声、発話の文字を保存します。" +
      "保存期間（既定では 7 日間）が過ぎると自動で削除されます。次の「開始」から反映されます。",
    "record.on": "録音中",
    "record.error": "録音できていません: {message}",
    "record.downloads": "録音のダウンロード",
    "record.preparing": "録音を準備しています…",
    "record.wav": "音声（WAV）",
    "record.transcript": "発話の記録（JSON）",
    "record.notYet": "まだ準備中かもしれません。少し待ってから開いてください。",
    "record.item": "{time} の会話",
    "slow.warning":
      "このGPUでは処理が実時間に間に合っていません。音声の一部が省略されています。",
    "footer.privacy": "このページは外部のサービスを使いません（インターネットのない LAN でも動きます）。",
    "footer.model": "モデル: J-Moshi（nu-dialogue、CC BY-NC 4.0）",
    "retry": "今すぐ試す",
    "reconnect": "今すぐ再接続",
    "openHttps": "https:// で開き直す",
    "openLocalhost": "localhost で開く",

    "state.checking.title": "サーバーを確認しています…",
    "state.checking.body": "",
    "state.loading.title": "モデルを読み込んでいます",
    "state.loading.body":
      "初回はモデルのダウンロードに時間がかかります（数 GB）。準備ができると自動で「開始」を押せるようになります。\n状況: {reason}",
    "state.failed.title": "モデルを読み込めませんでした",
    "state.failed.body": "サーバーの管理者は、サーバーのログを確認してください。\n理由: {reason}",
    "state.unreachable.title": "サーバーに接続できません",
    "state.unreachable.body":
      "サーバーが起動しているか、同じネットワークにつながっているかを確認してください。数秒ごとに自動で確認します。",
    "state.ready.title": "準備ができました",
    "state.ready.body": "「開始」を押して、J-Moshi に話しかけてください。",
    "state.insecure.title": "このままではマイクが使えません",
    "state.insecure.body":
      "このページは暗号化されていない http:// で開かれています。ブラウザは安全なページ（https:// か、同じ機械の localhost）にしかマイクを使わせません。\n" +
      "・ほかの機器（スマホなど）からは https:// のアドレスで開いてください。サーバーが HTTPS で動いていない場合は、管理者に HTTPS を有効にしてもらってください（README の「HTTPS」）。\n" +
      "・サーバーと同じパソコンなら http://localhost で開けます。",
    "state.nomicapi.title": "このブラウザではマイクが使えません",
    "state.nomicapi.body":
      "Safari・Chrome・Edge・Firefox の最新版で開いてください。アプリ内ブラウザ（LINE など）ではマイクが使えないことがあります。",
    "state.micDenied.title": "マイクの使用が許可されていません",
    "state.micDenied.body":
      "アドレスバーの鍵（またはマイク）のアイコンからマイクを「許可」にして、もう一度「開始」を押してください。iPhone では「設定」→「Safari」→「マイク」でも変えられます。",
    "state.noMic.title": "マイクが見つかりません",
    "state.noMic.body": "マイクかヘッドセットをつないでから、もう一度「開始」を押してください。",
    "state.micBusy.title": "マイクを使えませんでした",
    "state.micBusy.body":
      "ほかのアプリ（通話アプリなど）がマイクを使っていないか確認して、もう一度「開始」を押してください。\n詳細: {message}",
    "state.connecting.title": "接続しています…",
    "state.connecting.body": "",
    "state.waiting.title": "会話の準備をしています…",
    "state.waiting.body": "まもなく話せます（{seconds} 秒）。やめるときは「停止」を押してください。",
    "state.talking.title": "話せます。どうぞ話しかけてください",
    "state.talking.body": "終わるときは「停止」を押してください。",
    "state.busy.title": "ほかの人が J-Moshi と話しています",
    "state.busy.body":
      "J-Moshi は一度に一人としか話せません（いまの会話は {seconds} 秒前から続いています）。{countdown} 秒後に自動でもう一度試します。",
    "state.reconnecting.title": "接続が切れました。再接続しています",
    "state.reconnecting.body":
      "自動で再接続します（{attempt} 回目、{countdown} 秒後）。再接続すると新しい会話として始まります。\n理由: {reason}",
    "state.gaveUp.title": "再接続できませんでした",
    "state.gaveUp.body": "サーバーとネットワークを確認して、「開始」を押してください。",
    "state.sessionLimit.title": "会話の時間の上限に達しました",
    "state.sessionLimit.body": "1 回の会話は {limit}までです。「開始」を押すと新しい会話を始められます。",
    "state.idleTimeout.title": "声が届かないため会話を終了しました",
    "state.idleTimeout.body": "マイクがミュートになっていないか確認して、「開始」を押してください。",
    "state.unauthorized.title": "アクセスが許可されていません",
    "state.unauthorized.body":
      "このサーバーにはアクセス用のトークンが必要です。管理者から受け取ったアドレス（…?token=… の付いたもの）で開いてください。",
    "state.badParameter.title": "設定の値をサーバーが受け付けませんでした",
    "state.badParameter.body": "「設定」を直すか「既定に戻す」を押してから、「開始」を押してください。\n詳細: {message}",
    "state.noAnswer.title": "サーバーから応答がありません",
    "state.noAnswer.body": "しばらく待ってから「開始」を押してください。",
    "state.stopped.title": "会話を終了しました",
    "state.stopped.body": "「開始」を押すと、また話せます。",
    "state.error.title": "問題が起きました",
    "state.error.body": "「開始」を押してもう一度試してください。続く場合はサーバーの管理者に伝えてください。\n詳細: {message}",

    "reason.lost": "サーバーとの接続が切れました",
    "reason.shuttingDown": "サーバーが再起動または停止しました",
    "reason.slow": "通信が遅く、J-Moshi の音声を受け取りきれませんでした",
    "reason.unreachable": "サーバーに接続できません",
    "reason.loading": "モデルを読み込み中です",
    "unit.seconds": "{n} 秒",
    "unit.minutes": "{n} 分",
  },
  en: {
    "page.title": "J-Moshi — talk in Japanese",
    "page.tagline": "Full-duplex voice chat in Japanese",
    "lang.label": "Language",
    "start": "Start",
    "stop": "Stop",
    "start.hint": "Start turns the microphone on",
    "headphones.title": "Please use headphones or earphones",
    "headphones.body":
      "If the microphone picks up J-Moshi's voice from a speaker, J-Moshi starts answering itself.",
    "headphones.dismiss": "Got it",
    "meter.you": "You",
    "meter.model": "J-Moshi",
    "transcript.title": "What J-Moshi says",
    "transcript.empty": "J-Moshi's words will appear here.",
    "transcript.reconnected": "(reconnected)",
    "transcript.newConversation": "— new conversation —",
    "settings.title": "Settings",
    "settings.hint":
      "Leave a field empty to use the server's default. Higher temperatures give more varied answers, " +
      "lower ones steadier answers; a fixed seed makes answers repeatable. Applies from the next Start.",
    "settings.text_temperature": "Text temperature",
    "settings.text_topk": "Text top-k",
    "settings.audio_temperature": "Audio temperature",
    "settings.audio_topk": "Audio top-k",
    "settings.seed": "Seed",
    "settings.default": "default",
    "settings.random": "random each time",
    "settings.reset": "Reset to defaults",
    "settings.saved": "Saved on this device.",
    "settings.invalid": "Enter a number from {min} to {max}.",
    "settings.invalidInt": "Enter a whole number from {min} to {max}.",
    "settings.inForce": "Settings in this conversation",
    "stats.show": "Show stats",
    "stats.hide": "Hide stats",
    "stats.title": "Stats",
    "stats.latency": "Latency (estimate)",
    "stats.buffered": "Playback buffer",
    "stats.droppedPlayer": "Audio dropped (playback)",
    "stats.droppedServer": "Audio dropped (server)",
    "stats.underruns": "Playback gaps",
    "stats.step": "Server time per frame (p50)",
    "stats.stepDetail": "{total} ms (LM {lm} ms)",
    "stats.model": "Model",
    "stats.none": "—",
    "stats.slowServer":
      "The server needs more than one frame (80 ms) per frame, so audio stutters or lags. A faster GPU is needed.",
    "stats.times": "{n}",
    "stats.stepP95": "{total} ms (p95 {p95} ms, LM {lm} ms)",
    "stats.droppedDetail": "{ms} ms ({n} frames)",
    "record.label": "Record this conversation",
    "record.note":
      "When recording, the server keeps your voice, J-Moshi's voice and its words so you can download them " +
      "after the conversation. They are deleted after the retention period (7 days by default). Applies from the next Start.",
    "record.on": "Recording",
    "record.error": "Not recording: {message}",
    "record.downloads": "Download the recording",
    "record.preparing": "Preparing the recording…",
    "record.wav": "Audio (WAV)",
    "record.transcript": "Transcript (JSON)",
    "record.notYet": "It may not be ready yet; wait a moment, then open it.",
    "record.item": "Conversation at {time}",
    "slow.warning":
      "This GPU is too slow for real time: parts of the audio are being skipped.",
    "footer.privacy": "This page uses no outside service (it works on a LAN without internet).",
    "footer.model": "Model: J-Moshi (nu-dialogue, CC BY-NC 4.0)",
    "retry": "Try now",
    "reconnect": "Reconnect now",
    "openHttps": "Open with https://",
    "openLocalhost": "Open on localhost",

    "state.checking.title": "Checking the server…",
    "state.checking.body": "",
    "state.loading.title": "Loading the model",
    "state.loading.body":
      "The first start downloads the model (several GB), which takes a while. Start becomes available by itself when it is ready.\nNow: {reason}",
    "state.failed.title": "The model could not be loaded",
    "state.failed.body": "Whoever runs the server: please check its log.\nReason: {reason}",
    "state.unreachable.title": "Cannot reach the server",
    "state.unreachable.body":
      "Check that the server is running and that you are on the same network. The page checks again every few seconds.",
    "state.ready.title": "Ready",
    "state.ready.body": "Press Start and talk to J-Moshi (in Japanese).",
    "state.insecure.title": "The microphone cannot be used like this",
    "state.insecure.body":
      "This page was opened over unencrypted http://. Browsers only allow the microphone on secure pages (https://, or localhost on the same machine).\n" +
      "• From another device (a phone, say), open the https:// address. If the server does not run HTTPS, ask whoever runs it to turn it on (README, \"HTTPS\").\n" +
      "• On the machine running the server, http://localhost works.",
    "state.nomicapi.title": "This browser cannot use the microphone",
    "state.nomicapi.body":
      "Open the page in a current Safari, Chrome, Edge or Firefox. Browsers inside apps (LINE etc.) often have no microphone.",
    "state.micDenied.title": "Microphone access is blocked",
    "state.micDenied.body":
      "Allow the microphone from the lock (or microphone) icon in the address bar, then press Start again. On an iPhone: Settings → Safari → Microphone.",
    "state.noMic.title": "No microphone found",
    "state.noMic.body": "Connect a microphone or headset, then press Start again.",
    "state.micBusy.title": "The microphone could not be opened",
    "state.micBusy.body":
      "Check that no other app (a call, say) is using it, then press Start again.\nDetails: {message}",
    "state.connecting.title": "Connecting…",
    "state.connecting.body": "",
    "state.waiting.title": "Getting the conversation ready…",
    "state.waiting.body": "Almost there ({seconds} s). Press Stop to give up.",
    "state.talking.title": "Go ahead and talk",
    "state.talking.body": "Press Stop when you are done.",
    "state.busy.title": "Someone else is talking to J-Moshi",
    "state.busy.body":
      "J-Moshi talks with one person at a time (the current conversation started {seconds} s ago). Trying again by itself in {countdown} s.",
    "state.reconnecting.title": "Connection lost, reconnecting",
    "state.reconnecting.body":
      "Reconnecting by itself (attempt {attempt}, in {countdown} s). A reconnect starts a new conversation.\nReason: {reason}",
    "state.gaveUp.title": "Could not reconnect",
    "state.gaveUp.body": "Check the server and the network, then press Start.",
    "state.sessionLimit.title": "The conversation reached its time limit",
    "state.sessionLimit.body": "A conversation lasts at most {limit}. Press Start for a new one.",
    "state.idleTimeout.title": "Ended: no sound reached the server",
    "state.idleTimeout.body": "Check that the microphone is not muted, then press Start.",
    "state.unauthorized.title": "Access not allowed",
    "state.unauthorized.body":
      "This server needs an access token. Open the address you were given (the one with ?token=…).",
    "state.badParameter.title": "The server refused a setting",
    "state.badParameter.body": "Fix the settings or reset them, then press Start.\nDetails: {message}",
    "state.noAnswer.title": "The server does not answer",
    "state.noAnswer.body": "Wait a little, then press Start.",
    "state.stopped.title": "Conversation ended",
    "state.stopped.body": "Press Start to talk again.",
    "state.error.title": "Something went wrong",
    "state.error.body": "Press Start to try again. If it keeps happening, tell whoever runs the server.\nDetails: {message}",

    "reason.lost": "the connection to the server dropped",
    "reason.shuttingDown": "the server restarted or stopped",
    "reason.slow": "the connection was too slow to take J-Moshi's audio",
    "reason.unreachable": "cannot reach the server",
    "reason.loading": "the model is loading",
    "unit.seconds": "{n} s",
    "unit.minutes": "{n} min",
  },
};

export const LANGUAGES = Object.keys(MESSAGES);
let current = "ja";

/** Japanese unless the browser's preferred language is something else (then English). */
export function pickLanguage(stored, browserLanguage) {
  if (LANGUAGES.includes(stored)) return stored;
  const lang = (browserLanguage || "ja").toLowerCase();
  return lang.startsWith("ja") ? "ja" : "en";
}

export function language() {
  return current;
}

export function t(key, vars = {}) {
  const text = MESSAGES[current][key] ?? MESSAGES.ja[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => (name in vars ? String(vars[name]) : `{${name}}`));
}

export function applyLanguage(lang, root = document) {
  current = LANGUAGES.includes(lang) ? lang : "ja";
  document.documentElement.lang = current;
  document.title = t("page.title");
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-attr]")) {
    for (const pair of el.dataset.i18nAttr.split(";")) {
      const [attr, key] = pair.split(":");
      el.setAttribute(attr, t(key));
    }
  }
}
