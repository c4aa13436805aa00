"""The live status page served at GET / (one self-contained file: no CDN, no build step)."""

STATUS_PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Conflux</title></head>
<body><h1>Conflux</h1><pre id="status">loading…</pre>
<script>
async function refresh() {
  const response = await fetch("status", {cache: "no-store"});
  document.getElementById("status").textContent = JSON.stringify(await response.json(), null, 2);
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
