// Drives real JupyterLab in headless Chromium: opens a notebook with the hearth kernel, runs every
// cell through the menus, waits for the kernel to be idle and checks what the page shows; then
// interrupts a long cell and runs the next one. Started by test_jupyterlab.py, which starts the
// server; prints one JSON line of findings on stdout (the asserts live in the Python test).
//
//   LAB_URL=http://127.0.0.1:PORT LAB_TOKEN=... NOTEBOOK=01-quickstart.ipynb \
//   INTERRUPT_NOTEBOOK=interrupt.ipynb OUT_DIR=tests/browser/out node tests/browser/jupyterlab.mjs
import { chromium } from 'playwright-core';
import path from 'node:path';

const { LAB_URL, LAB_TOKEN, NOTEBOOK, INTERRUPT_NOTEBOOK, OUT_DIR } = process.env;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const MINUTE = 60_000;
const found = { notebook: NOTEBOOK };

async function waitForStatus(page, word, timeout) {
  await page.locator('#jp-main-statusbar').getByText(new RegExp(`\\| ${word}`)).first().waitFor({ timeout });
}

async function menu(page, top, item) {
  await page.locator(`.lm-MenuBar-itemLabel:text-is("${top}")`).click();
  await page.locator(`.lm-Menu-itemLabel:text-is("${item}")`).first().click();
}

async function open(page, name) {
  await page.goto(`${LAB_URL}/lab/tree/${name}?token=${LAB_TOKEN}`);
  await page.locator('.jp-Notebook .jp-Cell').first().waitFor({ timeout: MINUTE });
  await waitForStatus(page, 'Idle', 5 * MINUTE); // kernel started and connected
}

/// Input prompts of the code cells: "[3]:" once run, "[*]:" while queued or running.
async function prompts(page) {
  return page.locator('.jp-Notebook .jp-CodeCell .jp-InputPrompt').allInnerTexts();
}


/// Run all, wait until the long cell prints, Kernel → Interrupt Kernel, then run the next cell.
async function runInterrupt(page) {
  await menu(page, 'Run', 'Run All Cells');
  const long = page.locator('.jp-Notebook .jp-CodeCell').nth(1);
  await long.locator('.jp-OutputArea-output').getByText('sampling').waitFor({ timeout: 5 * MINUTE });
  const t0 = Date.now(); // the cell printed, so it is running its sample now
  await menu(page, 'Kernel', 'Interrupt Kernel');
  await long.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').first().waitFor({ timeout: MINUTE });
  await waitForStatus(page, 'Idle', MINUTE);
  found.interrupt_s = (Date.now() - t0) / 1000;
  found.interrupt_error = (await long.locator('.jp-OutputArea-output').allInnerTexts()).join('\n');
  const next = page.locator('.jp-Notebook .jp-CodeCell').nth(2);
  await next.locator('.jp-InputArea-editor').click();
  await menu(page, 'Run', 'Run Selected Cell');
  await next.locator('.jp-OutputArea-output').first().waitFor({ timeout: 2 * MINUTE });
  await waitForStatus(page, 'Idle', MINUTE);
  found.after_interrupt = (await next.locator('.jp-OutputArea-output').allInnerTexts()).join('\n');
  await page.screenshot({ path: path.join(OUT_DIR, 'interrupt.png') });
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
    '--disable-extensions', '--disable-component-update', '--no-first-run', '--mute-audio'],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 } });
  const page = await context.newPage();

  // 1. Run all cells of the notebook and wait until every code cell has an execution count.
  let t0 = Date.now();
  await open(page, NOTEBOOK);
  found.kernel_ready_s = (Date.now() - t0) / 1000;
  found.kernel_name = (await page.locator('.jp-KernelName, .jp-Toolbar-kernelName').first().innerText().catch(() => '')).trim();
  t0 = Date.now();
  await menu(page, 'Run', 'Run All Cells');
  await page.waitForFunction(() => {
    const ps = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(e => e.innerText);
    return ps.length > 0 && ps.every(p => /\[\d+\]/.test(p));
  }, null, { timeout: 5 * MINUTE, polling: 500 });
  await waitForStatus(page, 'Idle', MINUTE);
  found.run_all_s = (Date.now() - t0) / 1000;
  found.prompts = await prompts(page);
  const outputs = page.locator('.jp-Notebook .jp-OutputArea-output');
  found.plots = await page.locator('.jp-Notebook .jp-OutputArea-output').locator('img, svg').count();
  found.plot_boxes = await page.locator('.jp-Notebook .jp-OutputArea-output img').evaluateAll(
    imgs => imgs.map(i => ({ w: i.naturalWidth, h: i.naturalHeight, svg: i.src.startsWith('data:image/svg+xml') })));
  found.errors = await page.locator('.jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    .allInnerTexts();
  found.text = (await outputs.allInnerTexts()).join('\n');
  // Scroll to the trained samples and the final plot for the screenshot.
  await page.locator('.jp-Notebook .jp-OutputArea-output img').last().scrollIntoViewIfNeeded();
  found.screenshot = path.join(OUT_DIR, 'quickstart.png');
  await page.screenshot({ path: found.screenshot });

  // 2. Kernel → Interrupt Kernel during a long cell; the next cell still has `session`.
  // In a second tab: leaving the first (modified) notebook would raise a "leave page?" dialog.
  const tab = await context.newPage();
  await open(tab, INTERRUPT_NOTEBOOK);
  await runInterrupt(tab);
} catch (e) {

  found.failure = String(e && e.stack || e);
  try {
    const pages = browser.contexts().flatMap(c => c.pages());
    if (pages.length) await pages[0].screenshot({ path: path.join(OUT_DIR, 'failure.png') });
  } catch {}
} finally {
  await browser.close();
}
console.log(JSON.stringify(found));
