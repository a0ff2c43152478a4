// MathJax configuration for pymdownx.arithmatex (generic mode), as the material theme documents it.
// MathJax itself is the vendored tex-svg-full.js beside this file (mathjax 3.2.2 from npm): every
// TeX extension is built in and SVG output needs no web fonts, so nothing is fetched from a network.
window.MathJax = {
  loader: {
    load: []  // nothing beyond what tex-svg-full.js contains
  },
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  svg: {
    fontCache: "global"
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// Typeset again after material's instant navigation swaps the page.
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
