"""The profile report's HTML (a jinja2 template kept in Python, so it ships inside the package).

Everything is inline: CSS in a <style> block, figures as data: URIs, no script at all, so the
page renders offline with nothing fetched and nothing to fail in the browser's console."""

REPORT_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lcrun profile: {{ d.model.name or d.model.spec }}, {{ "{:,}".format(d.prefill.tokens) }} tokens</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; } .note { color: #666; font-size: 0.92em; } .missing { color: #a55; font-style: italic; }
.kpi { display: inline-block; margin: 0.3em 1.6em 0.3em 0; } .kpi b { font-size: 1.25em; }
</style>
</head>
<body>
<h1>lcrun profile</h1>
<div class="note">{{ d.model.name or d.model.spec }}: {{ d.model.layers }} layers, {{ bytes(d.model.weight_bytes) }} of weights
 in {{ d.model.dtype }}, on {{ d.meta.gpu or "CPU" }}; cache {{ d.cache }}; commit {{ d.meta.commit[:12] }}{% if d.meta.dirty %} (uncommitted changes){% endif %}; {{ d.meta.date }}</div>

<p>
<span class="kpi">decode <b>{{ ms(d.decode.timed_ms_median) }}</b>/token{% if d.decode.cuda_graph %} (CUDA graph){% endif %}</span>
<span class="kpi">weight-streaming floor <b>{{ ms(d.links.weight_floor_ms) }}</b> ({{ d.links.floor_link }} {{ rate(d.links.floor_bandwidth_bytes_per_s) }}, {{ d.links.floor_source }})</span>
<span class="kpi">profiled eager step <b>{{ ms(d.decode.profiled_ms_median) }}</b>{% if d.decode.basis == "gpu" %}, GPU work <b>{{ ms(gpu_work_ms) }}</b>{% endif %}</span>
<span class="kpi">prefill <b>{{ "{:,.0f}".format(d.prefill.tok_s) }}</b> tok/s over {{ "{:,}".format(d.prefill.tokens) }} tokens</span>
</p>

<h2>Decode step, split by named range</h2>
{% if figs.step_split %}<img alt="decode step split" src="data:image/png;base64,{{ figs.step_split }}">{% endif %}
<p class="note">{% if d.decode.basis == "gpu" %}GPU time of the {{ d.decode.steps|length }} profiled eager steps, from the
Chrome trace: each kernel, memcpy and memset goes to the innermost named range around the CUDA call that launched it
(linked by its correlation id), whatever stream it ran on; "prefetch" keeps the side-stream scoring, top-k and admission
nested in it. Where streams overlap, the main stream (stream {{ d.decode.main_stream }}) takes the time and the side
stream's is hidden ({{ "%.3f"|format(hidden_ms) }} ms/step hidden), so the parts add up to the step's wall time: "GPU wait"
is time with the next kernel already launched but not running, "GPU idle" time with nothing launched yet (the CPU
running Python, launching, or profiling).{% if d.decode.unlinked_kernels %} {{ d.decode.unlinked_kernels }} kernels had
no launch in the trace and count as "other".{% endif %} The host column is the CPU thread's time in each range.
{% else %}CPU time of the {{ d.decode.steps|length }} profiled steps, from the Chrome trace: each instant of the step goes
to the innermost named range open on its thread.{% endif %} Profiled steps run eagerly (no CUDA graph) with the profiler
on, so they are slower than the timed steps; the split shows where the work goes.</p>
<table>
<tr><th>part</th><th>range</th><th>mean ms / step</th><th>of the step</th>{% if d.decode.basis == "gpu" %}<th>of GPU work</th><th>host CPU ms / step</th>{% endif %}</tr>
{% for cat, v in d.decode.mean_components_ms.items() %}
<tr><td>{{ d.decode.labels[cat] }}</td><td><code>{{ cat }}</code></td><td class="n">{{ "%.3f"|format(v) }}</td>
<td class="n">{{ "%.1f"|format(100 * v / total_ms) if total_ms else "-" }}%</td>
{% if d.decode.basis == "gpu" %}<td class="n">{% if cat != "idle" and gpu_work_ms %}{{ "%.1f"|format(100 * v / gpu_work_ms) }}%{% else %}-{% endif %}</td>
<td class="n">{{ "%.2f"|format(cpu_ms[cat]) if cat in cpu_ms else "-" }}</td>{% endif %}</tr>
{% endfor %}
{% for cat, why in missing_ranges %}
<tr><td>{{ label(cat) }}</td><td><code>{{ cat }}</code></td><td colspan="{{ 4 if d.decode.basis == "gpu" else 2 }}" class="missing">{{ why }}</td></tr>
{% endfor %}
</table>

<h2>Decode time per step</h2>
<img alt="decode time per step" src="data:image/png;base64,{{ figs.step_times }}">
<p class="note">Median of the {{ d.decode.timed_ms|length }} timed steps{% if d.decode.timed_ms|length > 2 * d.decode.timed_warmup_steps %}
after the first {{ d.decode.timed_warmup_steps }} (compilation, CUDA-graph capture){% endif %}: {{ ms(d.decode.timed_ms_median) }}; the floor is every weight read once at the {{ d.links.floor_link }} bandwidth
({{ rate(d.links.floor_bandwidth_bytes_per_s) }}, {{ d.links.floor_source }}).</p>

<h2>Bandwidth per link</h2>
<img alt="bandwidth per link" src="data:image/png;base64,{{ figs.links }}">
<table>
<tr><th>link</th><th>bytes / step</th><th>achieved</th><th>peak</th><th>of peak</th><th>peak from</th><th>bytes from</th></tr>
{% for r in d.links.links %}
<tr><td>{{ r.link }}</td>
{% if r.absent %}<td colspan="3" class="note">{{ r.absent }}</td>{% elif r.bytes_per_step is none %}<td colspan="3" class="missing">not reported by this cache</td>{% else %}
<td class="n">{{ bytes(r.bytes_per_step) }}</td><td class="n">{{ rate(r.achieved_bytes_per_s) }}</td>
<td class="n">{{ rate(r.peak_bytes_per_s) if r.peak_bytes_per_s else "-" }}</td>{% endif %}
<td class="n">{{ "%.0f%%"|format(100 * r.fraction_of_peak) if r.fraction_of_peak else "-" }}</td>
<td>{{ r.peak_source if r.peak_bytes_per_s else "-" }}</td><td>{{ r.basis or "-" }}</td></tr>
{% endfor %}
</table>
<p class="note">Achieved = bytes per step / timed step time: the rate each link would have to sustain over the whole
step. Peaks: {% for r in d.links.links %}{{ r.link }}: {{ r.peak_source }}{% if r.peak_how %} ({{ r.peak_how }}){% endif %}{{ "; " if not loop.last else "." }}{% endfor %}
"measured now" is timed by this run before its prefill; "calibration cache" is what <code>lcrun calibrate</code> stored
for this machine; "default" is the planner's conservative guess.</p>

<h2>GPU page cache</h2>
<p class="note">Counters: {{ d.counters.source }}.</p>
{% if figs.hit_rates %}<img alt="hit rate and prefetch accuracy" src="data:image/png;base64,{{ figs.hit_rates }}">
{% else %}<p class="missing">Hit rate and prefetch accuracy: not reported by this cache.</p>{% endif %}
{% if not has_prefetch and figs.hit_rates %}<p class="missing">Prefetch accuracy: not reported by this cache.</p>{% endif %}
{% if figs.tier_pages %}<img alt="pages per tier" src="data:image/png;base64,{{ figs.tier_pages }}">
{% else %}<p class="missing">Pages per tier: not reported by this cache.</p>{% endif %}

<h2>Prefill</h2>
{% if figs.prefill %}<img alt="prefill throughput" src="data:image/png;base64,{{ figs.prefill }}">
{% else %}<p class="missing">One prefill chunk: no throughput curve.</p>{% endif %}
<p class="note">{{ "{:,}".format(d.prefill.tokens) }} tokens in {{ "%.2f"|format(d.prefill.seconds) }} s; each point is one
progress report of the prefill, timed with the device synchronised: {% if d.prefill.mode == "layer-major" %}this cache
prefills layer-major, so each point is one layer over the whole prompt (in chunks of up to {{ d.header.prefill_chunk }}
tokens) and the throughput per prompt position is not observed.{% else %}a chunk of up to {{ d.header.prefill_chunk }}
tokens.{% endif %}</p>

<h2>Trace</h2>
<p>Chrome/Perfetto trace of the profiled steps, with the named ranges: <a href="{{ d.trace }}">{{ d.trace }}</a>
(beside this file; open it in the Perfetto UI, <a href="https://ui.perfetto.dev">ui.perfetto.dev</a> &rarr; "Open trace
file", or chrome://tracing: both read the .gz directly and nothing leaves your machine). The split above can be re-run
from it: <code>python -m lcrun.profiling.attribution {{ d.trace }}</code>.</p>

<h2>Plan</h2>
{% if d.plan.error %}<p class="missing">No plan: {{ d.plan.error }}</p>{% else %}
{% if d.plan.note %}<p class="note">{{ d.plan.note }}.</p>{% endif %}
<pre>{{ d.plan.text }}</pre>{% endif %}

<h2>Settings</h2>
<table>{% for k, v in d.header.items() %}<tr><td><code>{{ k }}</code></td><td>{{ v }}</td></tr>{% endfor %}</table>

<h2>Run</h2>
<table>{% for k, v in d.meta.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
</body>
</html>
"""
