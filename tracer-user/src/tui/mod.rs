//! The live view: loop latency, memory hand-backs, causes and stalls as they happen.
//! `App` holds the data; `View` holds what the person chose (pause, sort, selection);
//! the panel modules only draw.
mod causes;
mod histogram;
mod stalls;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::Paragraph,
};

use crate::{app::App, flame, histogram::human_ns, session::Session};

const REFRESH: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    Newest,
    Longest,
    Verdict,
}

/// What the person looking at the screen has chosen; nothing here comes from the kernel.
pub struct View {
    pub paused: bool,
    /// Stalls shown while paused: the count when `p` was pressed.
    pub frozen_len: Option<usize>,
    pub sort: Sort,
    pub selected: usize,
    pub detail: bool,
    pub message: Option<(String, Instant)>,
    /// The loop thread the latency panel shows (None: all of them); `t` cycles.
    pub thread: Option<usize>,
}

impl View {
    fn new() -> Self {
        Self { paused: false, frozen_len: None, sort: Sort::Newest, selected: 0, detail: false, message: None, thread: None }
    }

    fn say(&mut self, msg: String) {
        self.message = Some((msg, Instant::now()));
    }
}

pub fn run(session: &mut Session) -> Result<()> {
    let mut terminal = ratatui::try_init()?;
    let result = event_loop(&mut terminal, session);
    ratatui::restore();
    result
}

fn event_loop(terminal: &mut DefaultTerminal, session: &mut Session) -> Result<()> {
    let mut view = View::new();
    let mut next_refresh = Instant::now();
    loop {
        // Records are drained even while paused: pausing the screen must not lose stalls.
        session.drain(false);
        if !view.paused && Instant::now() >= next_refresh {
            session.refresh()?;
            next_refresh = Instant::now() + REFRESH;
        }
        if session.finished().is_some() {
            session.drain(true);
            return Ok(());
        }
        terminal.draw(|f| draw(f, &session.app, &view))?;
        if event::poll(Duration::from_millis(100))?
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
            && !handle_key(key.code, &session.app, &mut view)
        {
            session.request_stop();
            session.drain(true);
            return Ok(());
        }
    }
}

/// Applies a key; false means quit.
fn handle_key(code: KeyCode, app: &App, view: &mut View) -> bool {
    let shown = stalls::visible(app, view).len();
    match code {
        KeyCode::Char('q') => return false,
        KeyCode::Esc if view.detail => view.detail = false,
        KeyCode::Esc => return false,
        KeyCode::Char('p') => {
            view.paused = !view.paused;
            view.frozen_len = view.paused.then_some(app.stalls.len());
        }
        KeyCode::Char('s') => {
            view.sort = match view.sort {
                Sort::Newest => Sort::Longest,
                Sort::Longest => Sort::Verdict,
                Sort::Verdict => Sort::Newest,
            };
            view.selected = 0;
        }
        KeyCode::Enter => view.detail = !view.detail && shown > 0,
        KeyCode::Char('t') => {
            view.thread = match view.thread {
                None if !app.threads.is_empty() => Some(0),
                Some(i) if i + 1 < app.threads.len() => Some(i + 1),
                _ => None,
            }
        }
        KeyCode::Down | KeyCode::Char('j') => view.selected = (view.selected + 1).min(shown.saturating_sub(1)),
        KeyCode::Up | KeyCode::Char('k') => view.selected = view.selected.saturating_sub(1),
        KeyCode::Char('f') => {
            let msg = match write_flame(app) {
                Ok(path) => format!("wrote {}", path.display()),
                Err(e) => format!("flame failed: {e:#}"),
            };
            view.say(msg);
        }
        _ => {}
    }
    true
}

fn write_flame(app: &App) -> Result<PathBuf> {
    let path = PathBuf::from(format!("stalltrace-{}-{}.svg", app.pid, app.started.elapsed().as_secs()));
    let records: Vec<serde_json::Value> = app.stalls.iter().filter_map(|s| serde_json::to_value(s).ok()).collect();
    let lines = flame::folded(&records);
    if lines.is_empty() {
        anyhow::bail!("no stalls yet");
    }
    flame::write_svg(&path, &lines, &format!("stalltrace: PID {} ({})", app.pid, app.comm))?;
    Ok(path)
}

fn draw(f: &mut Frame, app: &App, view: &View) {
    let [header, top, progress, table, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(if app.listeners.is_empty() { 10 } else { 13 }),
        Constraint::Length(u16::from(!app.in_progress.is_empty() || app.starving.is_some())),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(header_line(app, view), header);
    let [hist, side] = Layout::horizontal([Constraint::Percentage(58), Constraint::Percentage(42)]).areas(top);
    histogram::draw(f, hist, app, view.thread);
    causes::draw(f, side, app);
    draw_in_progress(f, progress, app);
    stalls::draw_table(f, table, app, view);
    f.render_widget(footer_line(view), footer);
    if view.detail {
        stalls::draw_detail(f, f.area(), app, view);
    }
}

fn header_line(app: &App, view: &View) -> Paragraph<'static> {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut spans = vec![
        Span::styled(" stalltrace ", bold.fg(Color::Black).bg(Color::Cyan)),
        Span::raw(format!(
            " PID {} {} | >={} | {}s | {} stalls | {} lost ",
            app.pid,
            app.comm,
            human_ns(app.threshold_ns),
            app.started.elapsed().as_secs(),
            app.stall_count(),
            app.lost
        )),
    ];
    if view.paused {
        spans.push(Span::styled(" PAUSED ", bold.fg(Color::Black).bg(Color::Yellow)));
    }
    Paragraph::new(Line::from(spans))
}

fn footer_line(view: &View) -> Paragraph<'static> {
    let text = match &view.message {
        Some((msg, at)) if at.elapsed() < Duration::from_secs(5) => format!(" {msg}"),
        _ => format!(
            " q quit p pause s sort ({:?}) t thread Enter details f flame SVG",
            view.sort
        ),
    };
    Paragraph::new(text).style(Style::default().fg(Color::DarkGray))
}

fn draw_in_progress(f: &mut Frame, area: Rect, app: &App) {
    let text = if let Some(s) = &app.starving {
        let g = s.groups.first();
        format!(
            " STARVATION: {} {}/{} threads asleep {} with nobody waking them{}",
            g.map_or("?", |g| g.name.as_str()),
            g.map_or(0, |g| g.parked),
            g.map_or(0, |g| g.threads),
            human_ns(s.duration_ns),
            if g.is_some_and(|g| g.closed_cycle) { " (wait cycle)" } else { "" }
        )
    } else if let Some(p) = app.in_progress.iter().max_by_key(|p| p.elapsed_ns) {
        format!(" STALL IN PROGRESS: thread {} ({}) has been in one iteration for {}{}", p.tid, p.comm, human_ns(p.elapsed_ns), p.now_in())
    } else {
        return;
    };
    let style = Style::default().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD);
    f.render_widget(Paragraph::new(text).style(style), area);
}
