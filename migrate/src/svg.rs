//! A small SVG writer under the three programs' pictures: a canvas that sizes itself to
//! what is drawn on it, text measured with a fixed-width estimate so that it fits its box
//! (long lines wrap, legends shorten), axes, bars, curves, legends, and XML escaping of
//! every text. No fonts and no system libraries: the estimate is deliberately generous
//! (0.6 em per character, wider than DejaVu Sans or Liberation Sans average), so text that
//! fits here fits in a viewer.
//!
//! Every text drawn is remembered as a box, so that a test can check a whole picture:
//! [`Canvas::problems`] names text that overlaps other text or leaves the canvas.

use std::fmt::Write as _;

/// Width of one character, in ems (a generous average for sans-serif fonts).
const EM_PER_CHAR: f64 = 0.6;
/// Margin left around the content when the canvas sizes itself.
const MARGIN: f64 = 10.0;

/// `s` with XML's special characters escaped.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The estimated width of `s` at font size `size`.
pub fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * EM_PER_CHAR
}

/// `s` broken into lines no wider than `width` at font size `size`: after a `, ` where it
/// can (a list of figures keeps each figure whole), else at spaces; a word too long for a
/// line of its own is shortened with an ellipsis.
pub fn wrap(s: &str, size: f64, width: f64) -> Vec<String> {
    let max = ((width / (size * EM_PER_CHAR)).floor() as usize).max(1);
    let len = |t: &str| t.trim_end().chars().count();
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    // What `cur` takes with a space after it.
    let taken = |cur: &str| if cur.is_empty() { 0 } else { len(cur) + 1 };
    for phrase in s.split_inclusive(", ") {
        if taken(&cur) + len(phrase) <= max {
            cur.push_str(phrase);
            continue;
        }
        if !cur.is_empty() {
            lines.push(cur.trim_end().to_string());
            cur.clear();
        }
        if len(phrase) <= max {
            cur.push_str(phrase);
            continue;
        }
        for word in phrase.split_inclusive(' ') {
            let word = shorten(word.trim_end(), max) + if word.ends_with(' ') { " " } else { "" };
            if !cur.is_empty() && taken(&cur) + len(&word) > max {
                lines.push(cur.trim_end().to_string());
                cur.clear();
            }
            cur.push_str(&word);
        }
    }
    lines.push(cur.trim_end().to_string());
    lines
}

/// `s`, shortened with an ellipsis to at most `max` characters.
pub fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Where a text's `x` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// Its left edge.
    Start,
    /// Its middle.
    Middle,
    /// Its right edge.
    End,
}

impl Anchor {
    fn attr(self) -> &'static str {
        match self {
            Self::Start => "",
            Self::Middle => r#" text-anchor="middle""#,
            Self::End => r#" text-anchor="end""#,
        }
    }
}

/// A text's style: size, anchor, colour, weight, and a quarter turn (a y-axis title).
#[derive(Clone, Copy, Debug)]
pub struct Style {
    /// Font size.
    pub size: f64,
    /// Where `x` is.
    pub anchor: Anchor,
    /// Fill colour.
    pub color: &'static str,
    /// Bold.
    pub bold: bool,
    /// Turned a quarter counter-clockwise about its anchor point (reads bottom to top).
    pub vertical: bool,
}

impl Style {
    /// Black, left-aligned, regular text of `size`.
    pub const fn new(size: f64) -> Self {
        Self {
            size,
            anchor: Anchor::Start,
            color: "#000",
            bold: false,
            vertical: false,
        }
    }

    /// Anchored at `a`.
    pub const fn anchor(self, anchor: Anchor) -> Self {
        Self { anchor, ..self }
    }

    /// In `color`.
    pub const fn color(self, color: &'static str) -> Self {
        Self { color, ..self }
    }

    /// Bold.
    pub const fn bold(self) -> Self {
        Self { bold: true, ..self }
    }

    /// Turned to read bottom to top.
    pub const fn vertical(self) -> Self {
        Self {
            vertical: true,
            ..self
        }
    }
}

/// A rectangle: left, top, right, bottom.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Box2 {
    /// Left.
    pub x0: f64,
    /// Top.
    pub y0: f64,
    /// Right.
    pub x1: f64,
    /// Bottom.
    pub y1: f64,
}

impl Box2 {
    fn overlaps(&self, o: &Self) -> bool {
        // A pixel of slack: boxes that only touch do not overlap.
        self.x0 < o.x1 - 1.0 && o.x0 < self.x1 - 1.0 && self.y0 < o.y1 - 1.0 && o.y0 < self.y1 - 1.0
    }
}

/// A picture being drawn; [`finish`](Self::finish) sizes it to its content.
#[derive(Debug, Default)]
pub struct Canvas {
    body: String,
    /// Every text drawn, with its box.
    texts: Vec<(String, Box2)>,
    /// The extent of everything drawn.
    right: f64,
    bottom: f64,
    /// Fixed size (for a picture laid out to a width), if set.
    fixed: Option<(f64, f64)>,
}

impl Canvas {
    /// An empty canvas.
    pub fn new() -> Self {
        Self::default()
    }

    fn extend(&mut self, x: f64, y: f64) {
        self.right = self.right.max(x);
        self.bottom = self.bottom.max(y);
    }

    /// Draws `s` at (`x`, `y`, its baseline) in `style`; returns its box.
    pub fn text(&mut self, x: f64, y: f64, style: Style, s: &str) -> Box2 {
        let w = text_width(s, style.size);
        let (before, after) = match style.anchor {
            Anchor::Start => (0.0, w),
            Anchor::Middle => (w / 2.0, w / 2.0),
            Anchor::End => (w, 0.0),
        };
        // Ascent about 0.8 em above the baseline, descent 0.25 em below it.
        let b = if style.vertical {
            Box2 {
                x0: x - 0.8 * style.size,
                y0: y - after,
                x1: x + 0.25 * style.size,
                y1: y + before,
            }
        } else {
            Box2 {
                x0: x - before,
                y0: y - 0.8 * style.size,
                x1: x + after,
                y1: y + 0.25 * style.size,
            }
        };
        let weight = if style.bold {
            r#" font-weight="bold""#
        } else {
            ""
        };
        let turn = if style.vertical {
            format!(r#" transform="rotate(-90 {x:.1} {y:.1})""#)
        } else {
            String::new()
        };
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{}" fill="{}"{}{weight}{turn}>{}</text>"#,
            style.size,
            style.color,
            style.anchor.attr(),
            esc(s)
        );
        self.texts.push((s.to_string(), b));
        self.extend(b.x1, b.y1);
        b
    }

    /// Draws `s` from (`x`, `y`) wrapped to `width` in `style`, one line every
    /// `1.25 × size`; returns the baseline after the last line.
    pub fn text_wrapped(&mut self, x: f64, y: f64, width: f64, style: Style, s: &str) -> f64 {
        let mut y = y;
        for line in wrap(s, style.size, width) {
            self.text(x, y, style, &line);
            y += 1.25 * style.size;
        }
        y
    }

    /// A rectangle, filled with `fill` (`none` for an outline) and outlined with `stroke`
    /// (`none` for none); `title` becomes its tooltip.
    pub fn rect(&mut self, b: Box2, fill: &str, stroke: &str, title: Option<&str>) {
        let (w, h) = (b.x1 - b.x0, b.y1 - b.y0);
        let _ = write!(
            self.body,
            r#"<rect x="{:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}" stroke="{stroke}""#,
            b.x0, b.y0
        );
        match title {
            Some(t) => {
                let _ = writeln!(self.body, "><title>{}</title></rect>", esc(t));
            }
            None => self.body.push_str("/>\n"),
        }
        self.extend(b.x1, b.y1);
    }

    /// A line.
    pub fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{stroke}"/>"#
        );
        self.extend(x1.max(x2), y1.max(y2));
    }

    /// A curve through `points`.
    pub fn polyline(&mut self, points: &[(f64, f64)], stroke: &str, width: f64) {
        let mut pts = String::new();
        for (x, y) in points {
            let _ = write!(pts, "{x:.1},{y:.1} ");
            self.extend(*x, *y);
        }
        let _ = writeln!(
            self.body,
            r#"<polyline fill="none" stroke="{stroke}" stroke-width="{width}" points="{}"/>"#,
            pts.trim_end()
        );
    }

    /// A legend from (`x`, `y`), at most `width` wide: a swatch of each colour, then its
    /// label wrapped to the rest of the width. Returns the baseline after the last entry.
    pub fn legend(
        &mut self,
        x: f64,
        y: f64,
        width: f64,
        size: f64,
        entries: &[(&'static str, String)],
    ) -> f64 {
        let mut y = y;
        for (color, label) in entries {
            self.rect(
                Box2 {
                    x0: x,
                    y0: y - 0.4 * size - 1.5,
                    x1: x + 10.0,
                    y1: y - 0.4 * size + 1.5,
                },
                color,
                "none",
                None,
            );
            y = self.text_wrapped(x + 14.0, y, width - 14.0, Style::new(size), label);
        }
        y
    }

    /// A frame with a vertical scale: ticks at each of `ticks` (value, label) on the left
    /// edge, light grid lines across. `y_of` maps a value to its y.
    pub fn y_axis(
        &mut self,
        frame: Box2,
        ticks: &[(f64, String)],
        y_of: &dyn Fn(f64) -> f64,
        size: f64,
    ) {
        for (v, label) in ticks {
            let y = y_of(*v);
            self.line((frame.x0, y), (frame.x1, y), "#eee");
            let st = Style::new(size).anchor(Anchor::End);
            self.text(frame.x0 - 4.0, y + 0.3 * size, st, label);
        }
        self.rect(frame, "none", "#999", None);
    }

    /// Sets the canvas to `width` × `height` instead of its content's extent.
    pub fn fixed_size(&mut self, width: f64, height: f64) {
        self.fixed = Some((width, height));
    }

    /// The canvas's size: its content's extent and a margin (or the fixed size).
    pub fn size(&self) -> (f64, f64) {
        self.fixed
            .unwrap_or(((self.right + MARGIN).ceil(), (self.bottom + MARGIN).ceil()))
    }

    /// Text that overlaps other text, or leaves the canvas, in words (empty: the picture
    /// is readable).
    pub fn problems(&self) -> Vec<String> {
        let (w, h) = self.size();
        let mut out = Vec::new();
        for (i, (s, b)) in self.texts.iter().enumerate() {
            if b.x0 < 0.0 || b.y0 < 0.0 || b.x1 > w || b.y1 > h {
                out.push(format!("{s:?} leaves the {w}×{h} canvas: {b:?}"));
            }
            for (t, c) in &self.texts[i + 1..] {
                if b.overlaps(c) {
                    out.push(format!("{s:?} overlaps {t:?}"));
                }
            }
        }
        out
    }

    /// The SVG document.
    pub fn finish(&self) -> String {
        let (w, h) = self.size();
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{}</svg>\n",
            self.body
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_wrapped_and_measured() {
        assert_eq!(esc(r#"a<b & "c">"#), "a&lt;b &amp; &quot;c&quot;&gt;");
        let lines = wrap("one two three four five", 10.0, 60.0); // 10 characters a line
        assert_eq!(lines, ["one two", "three four", "five"]);
        assert_eq!(wrap("abcdefghijklmnop", 10.0, 60.0), ["abcdefghi…"]);
        // A list breaks between its items where it can.
        let lines = wrap("mode — 3 faults, p50 5 µs, pause 1 ms", 10.0, 120.0);
        assert_eq!(lines, ["mode — 3 faults,", "p50 5 µs, pause 1 ms"]);
        assert_eq!(shorten("short", 9), "short");
        assert_eq!(text_width("abcd", 10.0), 24.0);
    }

    #[test]
    fn the_canvas_fits_its_content_and_names_text_that_collides() {
        let mut c = Canvas::new();
        c.text(10.0, 20.0, Style::new(10.0), "hello");
        c.rect(
            Box2 {
                x0: 0.0,
                y0: 30.0,
                x1: 300.0,
                y1: 40.0,
            },
            "red",
            "none",
            Some("a <bar>"),
        );
        assert_eq!(c.size(), (310.0, 50.0));
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let svg = c.finish();
        assert!(svg.contains("<title>a &lt;bar&gt;</title>"), "{svg}");
        // The mutant: text on top of other text, and text past a fixed edge.
        c.text(12.0, 21.0, Style::new(10.0), "world");
        assert!(c.problems()[0].contains("\"hello\" overlaps \"world\""));
        c.fixed_size(40.0, 50.0);
        assert!(c.problems().iter().any(|p| p.contains("leaves the 40×50")));
        // A vertical label's box is tall, not wide.
        let mut v = Canvas::new();
        let b = v.text(
            20.0,
            100.0,
            Style::new(10.0).anchor(Anchor::Middle).vertical(),
            "abcd",
        );
        assert_eq!((b.y0, b.y1), (88.0, 112.0));
    }
}
