"""The playground at `/`: pick an adapter, type a prompt, watch the tokens stream (plain HTML + fetch, no build)."""

PLAYGROUND_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>prefixtune playground</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
  label { display: block; margin-top: .8rem; font-weight: 600; }
  textarea, select, input { width: 100%; box-sizing: border-box; font: inherit; padding: .3rem; }
  .row { display: flex; gap: 1rem; } .row > div { flex: 1; }
  button { margin-top: 1rem; padding: .4rem 1.2rem; font: inherit; }
  pre { background: #f4f4f4; padding: 1rem; white-space: pre-wrap; min-height: 4rem; }
  #status { color: #666; }
</style>
</head>
<body>
<h1>prefixtune playground</h1>
<label for="model">Adapter</label>
<select id="model"></select>
<label for="prompt">Prompt</label>
<textarea id="prompt" rows="4" placeholder="Type a prompt"></textarea>
<div class="row">
  <div><label for="max_tokens">Max tokens</label><input id="max_tokens" type="number" value="64" min="1"></div>
  <div><label for="temperature">Temperature</label>
    <input id="temperature" type="number" value="0" min="0" max="2" step="0.1"></div>
  <div><label for="api_key">API key (if the server needs one)</label><input id="api_key" type="password"></div>
</div>
<button id="send">Generate</button> <span id="status">idle</span>
<pre id="output"></pre>
<script>
const $ = (id) => document.getElementById(id);
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}
async function loadModels() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (!r.ok) { $("status").textContent = "cannot list models: HTTP " + r.status; return; }
  const models = (await r.json()).data;
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.id; o.textContent = m.parent ? m.id : m.id + " (base model)";
    select.appendChild(o);
  }
  $("status").textContent = "ready";
}
async function generate() {
  $("output").textContent = ""; $("status").textContent = "streaming";
  const body = {model: $("model").value, prompt: $("prompt").value, stream: true, prompt_format: "adapter",
                max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value)};
  const r = await fetch("/v1/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    $("status").textContent = "error " + r.status + ": " + ((err.error || {}).message || r.statusText);
    return;
  }
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "", finish = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
      const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { $("status").textContent = "error: " + chunk.error.message; return; }
      for (const c of chunk.choices) {
        $("output").textContent += c.text;
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  }
  $("status").textContent = "done (" + finish + ")";
}
$("send").addEventListener("click", generate);
$("api_key").addEventListener("change", loadModels);
loadModels();
</script>
</body>
</html>
"""
