//! Plots in the terminal: which image protocol the terminal speaks (kitty, iTerm2, sixel or
//! none), the SVG rasterised with resvg, and the escape sequences of each protocol.

use base64::Engine as _;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, OnceLock};

/// An inline-image protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// kitty's graphics protocol (kitty, Ghostty, WezTerm).
    Kitty,
    /// iTerm2's inline images (iTerm2, WezTerm, Konsole).
    Iterm,
    /// DEC sixel (xterm -ti vt340, foot, mlterm, Windows Terminal, tmux built with sixel).
    Sixel,
    /// No images: a text plot and the path of a saved PNG.
    None,
}

/// Decides the protocol for stdout: `forced` (the `--images` flag) wins; a pipe or a file gets
/// none; else the terminal is recognised by its environment (kitty, iTerm2, WezTerm, Ghostty),
/// and any other terminal is asked for its device attributes (sixel is attribute 4).
pub fn detect(forced: Option<Protocol>) -> Protocol {
    if let Some(p) = forced {
        return p;
    }
    if !std::io::stdout().is_terminal() {
        return Protocol::None;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let (term, program) = (var("TERM"), var("TERM_PROGRAM"));
    if term.contains("kitty") || std::env::var_os("KITTY_WINDOW_ID").is_some() || program == "ghostty" {
        return Protocol::Kitty;
    }
    if program == "iTerm.app" || program == "WezTerm" || var("LC_TERMINAL") == "iTerm2" {
        return Protocol::Iterm;
    }
    if term == "dumb" {
        return Protocol::None;
    }
    match device_attributes() {
        Some(attrs) if attrs.split(';').any(|a| a == "4") => Protocol::Sixel,
        _ => Protocol::None,
    }
}

/// Asks the terminal for its primary device attributes (`ESC [ c`) and returns the answer's
/// parameters (`?62;4;22` → `62;4;22`), waiting at most 200 ms; `None` if stdin is not the
/// terminal or nothing came back.
fn device_attributes() -> Option<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return None;
    }
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is a plain C struct filled by tcgetattr; we restore it before returning.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a terminal (checked above) and `saved` is a valid out-pointer.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return None;
    }
    let mut raw = saved;
    raw.c_lflag &= !(libc::ICANON | libc::ECHO);
    raw.c_cc[libc::VMIN] = 0;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: a valid termios for a terminal fd.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
    let mut out = std::io::stdout();
    let _ = out.write_all(b"\x1b[c");
    let _ = out.flush();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    let mut answer = Vec::new();
    while !answer.ends_with(b"c") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
            break;
        }
        let mut buf = [0u8; 64];
        // SAFETY: buf is valid for 64 bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n as usize]);
    }
    // SAFETY: restores the settings read above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    let text = String::from_utf8_lossy(&answer);
    let start = text.find("\x1b[?")? + 3;
    let end = start + text[start..].find('c')?;
    Some(text[start..end].to_string())
}

fn fonts() -> Arc<resvg::usvg::fontdb::Database> {
    static DB: OnceLock<Arc<resvg::usvg::fontdb::Database>> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = resvg::usvg::fontdb::Database::new();
        db.load_system_fonts();
        // plotters writes `sans-serif`; fontdb maps that to Arial, which Linux rarely has
        let families: Vec<String> = db.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone())).collect();
        if let Some(sans) = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial", "Helvetica"]
            .iter()
            .find(|f| families.iter().any(|n| n == *f))
        {
            db.set_sans_serif_family(*sans);
        }
        Arc::new(db)
    })
    .clone()
}

/// An RGBA image.
pub struct Raster {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// RGBA, premultiplied, row-major.
    pub rgba: Vec<u8>,
    png: Vec<u8>,
}

impl Raster {
    /// The PNG file's bytes.
    pub fn png(&self) -> &[u8] {
        &self.png
    }
}

/// Rasterises an SVG document (text with the system's fonts).
pub fn rasterize(svg: &str) -> Result<Raster, String> {
    let opts = resvg::usvg::Options { fontdb: fonts(), ..Default::default() };
    let tree = resvg::usvg::Tree::from_str(svg, &opts).map_err(|e| format!("SVG: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).ok_or("SVG of zero size")?;
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let png = pixmap.encode_png().map_err(|e| format!("PNG: {e}"))?;
    Ok(Raster { width: size.width(), height: size.height(), rgba: pixmap.data().to_vec(), png })
}

/// The escape sequence that shows `img` inline with `protocol` (empty for [`Protocol::None`]).
pub fn encode(img: &Raster, protocol: Protocol) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    match protocol {
        Protocol::None => Vec::new(),
        Protocol::Kitty => {
            // PNG, transmitted and shown at once, in chunks of at most 4096 base64 bytes
            let data = b64.encode(img.png());
            let chunks: Vec<&[u8]> = data.as_bytes().chunks(4096).collect();
            let mut out = Vec::new();
            for (i, chunk) in chunks.iter().enumerate() {
                let more = u8::from(i + 1 < chunks.len());
                if i == 0 {
                    out.extend_from_slice(format!("\x1b_Ga=T,f=100,q=2,m={more};").as_bytes());
                } else {
                    out.extend_from_slice(format!("\x1b_Gm={more};").as_bytes());
                }
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\x1b\\");
            }
            out
        }
        Protocol::Iterm => format!(
            "\x1b]1337;File=inline=1;size={};preserveAspectRatio=1:{}\x07",
            img.png().len(),
            b64.encode(img.png())
        )
        .into_bytes(),
        Protocol::Sixel => sixel(img),
    }
}

/// DEC sixel, colours quantised to a 6×6×6 cube (plots are a few flat colours on white).
fn sixel(img: &Raster) -> Vec<u8> {
    let (w, h) = (img.width as usize, img.height as usize);
    let level = |c: u8| (u16::from(c) * 5 + 127) / 255;
    let index: Vec<u16> = img.rgba.chunks_exact(4).map(|p| level(p[0]) * 36 + level(p[1]) * 6 + level(p[2])).collect();
    let mut used = [false; 216];
    for &i in &index {
        used[i as usize] = true;
    }
    let mut out = format!("\x1bP0;1;0q\"1;1;{w};{h}");
    for (i, _) in used.iter().enumerate().filter(|(_, u)| **u) {
        let pct = |l: usize| l * 100 / 5;
        out += &format!("#{i};2;{};{};{}", pct(i / 36), pct(i / 6 % 6), pct(i % 6));
    }
    for band in (0..h).step_by(6) {
        let rows = (h - band).min(6);
        let mut colours: Vec<u16> = index[band * w..(band + rows) * w].to_vec();
        colours.sort_unstable();
        colours.dedup();
        for (k, &c) in colours.iter().enumerate() {
            out += &format!("#{c}");
            let column = |x: usize| -> char {
                let bits = (0..rows).filter(|dy| index[(band + dy) * w + x] == c).fold(0u8, |b, dy| b | (1 << dy));
                char::from(63 + bits)
            };
            let mut x = 0;
            while x < w {
                let ch = column(x);
                let mut run = 1;
                while x + run < w && column(x + run) == ch {
                    run += 1;
                }
                if run > 3 {
                    out += &format!("!{run}{ch}");
                } else {
                    out.extend(std::iter::repeat_n(ch, run));
                }
                x += run;
            }
            out.push(if k + 1 < colours.len() { '$' } else { '-' });
        }
    }
    out += "\x1b\\";
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plot() -> Raster {
        let p = hearth::Plot::new("loss", "step", "loss")
            .series("main", (0..30).map(|i| (f64::from(i), 5.0 / (1.0 + f64::from(i)))));
        rasterize(&p.svg()).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn plots_rasterise_with_their_text() {
        let img = plot();
        assert_eq!((img.width, img.height), (640, 360));
        assert!(img.png().starts_with(b"\x89PNG\r\n\x1a\n"));
        // the title is drawn: dark pixels in the caption strip (the top 30 rows, above the axes)
        let dark = img.rgba.chunks_exact(4).take(640 * 30).filter(|p| p[0] < 100 && p[1] < 100 && p[2] < 100).count();
        assert!(dark > 20, "no caption text was rendered ({dark} dark pixels): fonts missing?");
    }

    #[test]
    fn protocols_frame_their_payloads() {
        let img = plot();
        let kitty = String::from_utf8(encode(&img, Protocol::Kitty)).unwrap_or_default();
        assert!(
            kitty.starts_with("\x1b_Ga=T,f=100,q=2,m=1;") && kitty.contains("\x1b_Gm=0;") && kitty.ends_with("\x1b\\")
        );
        let payload: String = kitty.split("\x1b\\").map(|c| c.split_once(';').map_or("", |(_, d)| d)).collect();
        let png = base64::engine::general_purpose::STANDARD.decode(payload).unwrap_or_default();
        assert_eq!(png, img.png(), "kitty chunks reassemble to the PNG");
        let iterm = String::from_utf8(encode(&img, Protocol::Iterm)).unwrap_or_default();
        assert!(
            iterm.starts_with(&format!("\x1b]1337;File=inline=1;size={};", img.png().len())) && iterm.ends_with('\x07')
        );
        assert!(encode(&img, Protocol::None).is_empty());
    }

    #[test]
    fn sixel_encodes_every_pixel() {
        // a 3×7 image: white, with a red column in the middle; two bands (6 + 1 rows)
        let (w, h) = (3usize, 7usize);
        let mut rgba = vec![255u8; w * h * 4];
        for y in 0..h {
            rgba[(y * w + 1) * 4..(y * w + 1) * 4 + 4].copy_from_slice(&[255, 0, 0, 255]);
        }
        let img = Raster { width: 3, height: 7, rgba, png: Vec::new() };
        let s = String::from_utf8(sixel(&img)).unwrap_or_default();
        // red = cube index 5*36 = 180, white = 215
        assert!(s.starts_with("\x1bP0;1;0q\"1;1;3;7#180;2;100;0;0#215;2;100;100;100"), "{s}");
        // band 1: red has bits 0-5 in column 1 only ('?' + 63 = '~'); white in columns 0 and 2
        assert!(s.contains("#180?~?$#215~?~-"), "{s}");
        // band 2 (one row): bit 0 only ('@')
        assert!(s.contains("#180?@?$#215@?@-"), "{s}");
        assert!(s.ends_with("\x1b\\"));
    }
}
