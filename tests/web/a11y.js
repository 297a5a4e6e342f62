// Run in the page by tests/web/test_web_browser.py (selenium execute_script): returns what fails.
const problems = [];
for (const el of document.querySelectorAll('input, select, textarea')) {
  if (el.type === 'hidden') continue;
  if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label')) problems.push('unlabelled ' + (el.id || el.name));
}
const levels = [...document.querySelectorAll('h1, h2, h3, h4, h5, h6')].map(h => +h.tagName[1]);
if (levels.filter(l => l === 1).length !== 1) problems.push('h1 count ' + levels.filter(l => l === 1).length);
for (let i = 1; i < levels.length; i++) if (levels[i] > levels[i - 1] + 1) problems.push('heading skips to h' + levels[i]);
function rgb(text) { const m = text.match(/[\d.]+/g).map(Number); return {r: m[0], g: m[1], b: m[2], a: m.length > 3 ? m[3] : 1}; }
function lum(c) { return [c.r, c.g, c.b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); })
  .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0); }
function background(el) {
  for (let e = el; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c.a > 0.5) return c; }
  return {r: 255, g: 255, b: 255, a: 1};
}
let checked = 0;
for (const el of document.querySelectorAll('body *')) {
  if (el.closest('svg')) continue;
  const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
  const style = getComputedStyle(el);
  if (!own || style.visibility === 'hidden' || el.getClientRects().length === 0) continue;
  if (el.closest('.skip')) continue;
  const fg = rgb(style.color), bg = background(el);
  const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  const ratio = (a + 0.05) / (b + 0.05);
  const size = parseFloat(style.fontSize), bold = +style.fontWeight >= 700;
  const need = (size >= 24 || (bold && size >= 18.66)) ? 3 : 4.5;
  checked++;
  if (ratio < need) problems.push('contrast ' + ratio.toFixed(2) + ' ' + el.tagName + ' "' + el.textContent.trim().slice(0, 30) + '"');
}
const overflow = document.documentElement.scrollWidth - window.innerWidth;
return {problems: [...new Set(problems)], checked: checked, overflow: overflow};
